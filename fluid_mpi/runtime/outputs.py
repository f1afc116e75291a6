"""What a run leaves behind: JSON-lines predictions (the durable record of what was answered, which
take-over and ``--resume`` rely on) and one JSON summary. Pure Python; the runtime loops call it."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# Predictions are flushed to the OS after every batch (a dead process loses nothing) and fsynced at most
# every 50 ms (a power cut of the coordinator's device loses at most that much, which --resume answers
# again, once). Measured here: fsync 170 µs vs flush 4 µs per batch-64 write; per batch it would cost
# ~6 % of a High-Throughput coordinator's time at 22k images/s, at 50 ms intervals ~0.3 %.
FSYNC_INTERVAL_S = 0.05


@dataclass
class Answered:
    """Indices already in a predictions file, and how many torn/corrupt lines were found there."""

    indices: set[int] = field(default_factory=set)
    torn: int = 0


def read_answered(path: str | os.PathLike | None, repair: bool = False) -> Answered:
    """Read a predictions file. A line that is not a complete JSON object with an ``index`` (a half-written
    last line left by a process that died mid-write) is counted in ``torn``; with ``repair`` the file is cut
    back to its last complete line (only a torn *last* line can be cut; a corrupt line elsewhere is
    counted and left), and a complete last record whose newline is missing gets it back (it is kept)."""
    out = Answered()
    if path is None or not Path(path).exists():
        return out
    data = Path(path).read_bytes()
    good_end, newline_missing = 0, False
    for raw in data.splitlines(keepends=True):
        try:
            rec = json.loads(raw)
            out.indices.add(int(rec["index"]))
            good_end += len(raw)
            newline_missing = not raw.endswith(b"\n")  # complete record, died before its newline
            continue
        except (ValueError, KeyError, TypeError):
            pass
        out.torn += 1
        if raw.endswith(b"\n"):
            good_end += len(raw)  # a corrupt line in the middle is counted and left in place
    if repair and (good_end < len(data) or newline_missing):
        with open(path, "rb+") as fh:
            fh.truncate(good_end)
            if newline_missing:
                fh.seek(good_end)
                fh.write(b"\n")
    return out


class PredictionSink:
    """Counts answers (exactly once per input) and writes them as JSON lines when a path is given."""

    def __init__(self, path: str | os.PathLike | None, append: bool = False, with_logits: bool = False,
                 progress_total: int | None = None):
        self.path, self.with_logits = path, with_logits
        self.bar = None
        if progress_total:  # a progress bar on stderr (rank 0 only; -q turns it off)
            from tqdm import tqdm

            self.bar = tqdm(total=progress_total, unit="img", desc="infer", leave=False)
        self.answered: set[int] = set()
        self.duplicates = 0
        self.correct = 0
        self.timeline: list[tuple[float, int]] = []  # (seconds since start, images answered)
        self.latencies: list[tuple[float, int]] = []  # (seconds from hand-over to answer, images)
        self.t0 = time.perf_counter()
        self._fh = None
        self._synced = 0.0
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(path, "a" if append else "w", encoding="utf-8")

    def write(self, indices: np.ndarray, labels: np.ndarray, logits: np.ndarray, rank: int,
              extra: dict | None = None, started: float | None = None) -> None:
        """Record one answered batch; an index answered before counts as a duplicate and is not written.
        ``started``: ``time.monotonic()`` when the batch's inputs were handed to the coordinator."""
        preds = logits.argmax(1).tolist()
        labels = labels.tolist()
        # per-batch fields formatted once; the lines themselves by hand (json.dumps per line cost
        # ~10 % of the coordinator's time in High-Throughput runs)
        tail = "".join(f", {json.dumps(k)}: {json.dumps(v)}" for k, v in (extra or {}).items())
        lines = []
        for i, idx in enumerate(indices.tolist()):
            if idx in self.answered:
                self.duplicates += 1
                continue
            self.answered.add(idx)
            self.correct += preds[i] == labels[i]
            line = f'{{"index": {idx}, "label": {labels[i]}, "pred": {preds[i]}, "rank": {rank}{tail}'
            if self.with_logits:
                line += ', "logits": [' + ", ".join(f"{float(v):.6g}" for v in logits[i]) + "]"
            lines.append(line + "}")
        self.timeline.append((round(time.perf_counter() - self.t0, 4), len(indices)))
        if started is not None and lines:
            self.latencies.append((time.monotonic() - started, len(lines)))
        if self.bar is not None:
            self.bar.update(len(indices))
        if self._fh is not None and lines:
            self._fh.write("\n".join(lines) + "\n")
            self._fh.flush()  # a dead process loses nothing
            now = time.monotonic()
            if now - self._synced >= FSYNC_INTERVAL_S:
                self.sync()
                self._synced = now

    def latency_ms(self) -> dict | None:
        """Per-image latency percentiles ``{p50, p95, p99}`` in ms (None when nothing was timed)."""
        if not self.latencies:
            return None
        values = np.repeat([lat for lat, _ in self.latencies], [n for _, n in self.latencies])
        p50, p95, p99 = np.percentile(values, [50, 95, 99]) * 1000
        return {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3)}

    def sync(self) -> None:
        """Make everything written so far durable (also called before a stop and at close)."""
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self._fh is not None:
            self.sync()
            self._fh.close()
            self._fh = None


@dataclass
class Summary:
    """The JSON summary of one run (``--summary``), built from the sink and the event log."""

    family: str
    mode: str
    checkpoint: str
    data: str
    batch_size: int
    combine: str | None
    width_start: int | None
    width_end: int | None
    ranks_start: int
    ranks_end: int
    images: int
    answered: int
    answered_here: int
    resumed: int
    torn_lines_repaired: int
    duplicates: int
    correct: int
    accuracy: float
    elapsed_s: float
    images_per_s: float
    latency_ms: dict | None
    status: str
    exit_code: int
    message: str
    failures: list[dict]
    events: list[dict]
    timeline: list
    takeover: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def write_summary(path: str | os.PathLike | None, summary: dict) -> None:
    """Write the JSON summary atomically."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def human_summary(s: dict) -> str:
    """A few readable lines for stdout."""
    lines = [f"{s['family']} {s.get('mode') or ''} on {s['ranks_start']} rank(s): status {s['status']}",
             f"  answered {s['answered']}/{s['images']} images, accuracy {s['accuracy']:.2f} %, "
             f"{s['images_per_s']:.1f} images/s in {s['elapsed_s']:.2f} s, duplicates {s['duplicates']}"]
    for f in s.get("failures", []):
        lines.append(f"  failure: rank {f['rank']} on {f.get('host', '?')} ({f.get('fault')}, "
                     f"{f.get('how', '?')}) after batch {f.get('after_batch')}, detected in "
                     f"{f.get('detected_ms')} ms; continued on {s['ranks_end']} rank(s)")
    if s.get("message"):
        lines.append(f"  {s['message']}")
    return "\n".join(lines)
