"""What a run leaves behind: JSON-lines predictions (flushed per batch, so an answer written before a
failure is kept) and one JSON summary. Pure Python; the runtime loops call it."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np


def answered_indices(path: str | os.PathLike) -> set[int]:
    """Input indices already answered in a predictions file (a torn last line is ignored)."""
    done: set[int] = set()
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if not line.endswith("\n"):
                    break
                try:
                    done.add(int(json.loads(line)["index"]))
                except (ValueError, KeyError, TypeError):
                    continue
    except FileNotFoundError:
        pass
    return done


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
        self.t0 = time.perf_counter()
        self._fh = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            if append:
                _drop_torn_tail(path)
            self._fh = open(path, "a" if append else "w", encoding="utf-8")

    def write(self, indices: np.ndarray, labels: np.ndarray, logits: np.ndarray, rank: int,
              extra: dict | None = None) -> None:
        """Record one answered batch; an index answered before counts as a duplicate and is not written."""
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
        if self.bar is not None:
            self.bar.update(len(indices))
        if self._fh is not None and lines:
            self._fh.write("\n".join(lines) + "\n")
            self._fh.flush()  # an answer written before a failure is kept

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _drop_torn_tail(path) -> None:
    """Cut a half-written last line (left by a coordinator that died mid-write)."""
    try:
        with open(path, "rb+") as fh:
            data = fh.read()
            if data and not data.endswith(b"\n"):
                fh.truncate(data.rfind(b"\n") + 1)
    except FileNotFoundError:
        pass


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
        lines.append(f"  failure: rank {f['rank']} ({f.get('how', '?')}) after batch {f.get('after_batch')}, "
                     f"detected in {f.get('detected_ms')} ms; continued on {s['ranks_end']} rank(s)")
    if s.get("message"):
        lines.append(f"  {s['message']}")
    return "\n".join(lines)
