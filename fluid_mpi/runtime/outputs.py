"""What a run leaves behind: JSON-lines predictions (the durable record of what was answered, which
take-over and ``--resume`` rely on) and one JSON summary. Pure Python; the runtime loops call it."""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .latency import LatencyStats

# Predictions are flushed to the OS after every batch (a dead process loses nothing) and fsynced at most
# every 50 ms (a power cut of the coordinator's device loses at most that much, which --resume answers
# again, once). Measured here: fsync 170 µs vs flush 4 µs per batch-64 write; per batch it would cost
# ~6 % of a High-Throughput coordinator's time at 22k images/s, at 50 ms intervals ~0.3 %. Under other users'
# load an fsync took 4-7 ms here (1.1 s of a 9 s batch-1 run, 12 %), so a helper thread makes them (fsync
# releases the GIL): the loop only asks, and a durable copy lags by the interval plus one fsync.
FSYNC_INTERVAL_S = 0.05


class _Syncer:
    """A daemon thread that fsyncs ``fd`` when asked; requests made while it is busy are merged into one.
    It syncs through a duplicate of ``fd``, closed by :meth:`stop`: a sink dropped without ``close()`` has
    its file closed by the garbage collector, and an fsync asked just before then hit a closed descriptor
    (EBADF, a traceback from the thread in the test suite) or another file that had reused its number."""

    def __init__(self, fd: int):
        self.fd, self.cond = os.dup(fd), threading.Condition()
        self.pending = self.busy = self.stopping = False
        self.thread = threading.Thread(target=self._run, name="fluid-mpi-fsync", daemon=True)
        self.thread.start()

    def request(self) -> None:
        with self.cond:
            self.pending = True
            self.cond.notify_all()

    def settled(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s until no fsync is asked for or under way."""
        with self.cond:
            return self.cond.wait_for(lambda: not (self.pending or self.busy), timeout)

    def _run(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.pending or self.stopping)
                if self.stopping:
                    return
                self.pending, self.busy = False, True
            os.fsync(self.fd)
            with self.cond:
                self.busy = False
                self.cond.notify_all()

    def stop(self) -> None:
        """Finish the fsync under way, if any, and end the thread (the caller then syncs what is left)."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join()
        os.close(self.fd)


def _tail(extra: dict | None) -> str:
    """The per-batch fields of a prediction line (mode, groups or width) as JSON text."""
    return "".join(f", {json.dumps(k)}: {json.dumps(v)}" for k, v in (extra or {}).items())


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


def answerer(rank: int, extra: dict | None) -> str:
    """Who answered a batch: the groups of an HA head (``"0+1"``), a Dynamic width (``"width 2"``), else
    the answering rank's own group (HT; group j lives on world rank j)."""
    extra = extra or {}
    if "groups" in extra:
        return str(extra["groups"])
    if "width" in extra:
        return f"width {extra['width']}"
    return str(rank)


def accuracy_by_answerer(by: dict[str, list[int]]) -> dict[str, dict]:
    """``{answerer: {"answered": labelled answers, "accuracy": %}}`` for the summary (labelled ones only)."""
    return {k: {"answered": n, "accuracy": round(100.0 * c / n, 3)} for k, (n, c) in sorted(by.items()) if n}


class PredictionSink:
    """Counts answers (exactly once per input) and writes them as JSON lines when a path is given."""

    def __init__(self, path: str | os.PathLike | None, append: bool = False, with_logits: bool = False,
                 progress_total: int | None = None, classes: Sequence[str] | None = None):
        self.path, self.with_logits = path, with_logits
        # class names beside the index, when they say more than the index (not MNIST's "0".."9")
        named = classes is not None and any(c != str(i) for i, c in enumerate(classes))
        self._names = [json.dumps(c) for c in classes] if named else None
        self.bar = None
        if progress_total:  # a progress bar on stderr (rank 0 only; -q turns it off)
            from tqdm import tqdm

            self.bar = tqdm(total=progress_total, unit="img", desc="infer", leave=False)
        self.answered: set[int] = set()
        self.duplicates = 0
        self.correct = 0
        self.timeline: list[tuple[float, int]] = []  # (seconds since start, images answered)
        self.latency = LatencyStats()  # from each input's arrival (or hand-over) to its answer
        self.labelled = 0  # answers whose label is known (accuracy is over these)
        # per answerer (HA: the groups whose head answered, "0+1"; HT: the group alone, "1"; sliced: "width
        # 2"): [labelled answers, correct ones], so a run shows what each mode and each survivor subset cost
        self.by_answerer: dict[str, list[int]] = {}
        self.errors = 0  # inputs that could not be read (answered with an error line)
        self.t0 = time.perf_counter()
        self._fh = None
        self._syncer: _Syncer | None = None
        self._synced = 0.0
        self._forms: dict[tuple, str] = {}  # (rank, extra) -> the line format of the usual batch
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(path, "a" if append else "w", encoding="utf-8")
            self._syncer = _Syncer(self._fh.fileno())

    def write(self, batch, logits: np.ndarray, rank: int, extra: dict | None = None) -> None:
        """Record one answered :class:`~fluid_mpi.runtime.inputs.Batch`: per input its key (``index``),
        name when it has one, label when known, class, confidence (softmax), rank, the per-batch ``extra``
        fields (mode, groups or width) and its latency. An input answered before counts as a duplicate and
        is not written."""
        now = time.monotonic()
        preds = logits.argmax(1)
        shifted = np.exp(logits - logits.max(1, keepdims=True))
        conf = (1.0 / shifted.sum(1)).tolist()  # softmax probability of the predicted class
        lat = ((now - batch.arrived) * 1000.0).tolist()
        keys = batch.keys.tolist()
        new = set(keys)
        if batch.names is None and not self.with_logits and len(new) == len(keys) and \
                self.answered.isdisjoint(new) and (batch.labels >= 0).all():
            # the usual batch (labelled, all new): one %-format per line, its per-batch part made once per
            # (rank, extra) (json.dumps per line cost ~10 % of a High-Throughput coordinator's time)
            self.answered |= new
            self.labelled += len(keys)
            hits = int(np.count_nonzero(preds == batch.labels))
            self.correct += hits
            tally = self.by_answerer.setdefault(answerer(rank, extra), [0, 0])
            tally[0] += len(keys)
            tally[1] += hits
            form = self._line_format(rank, extra)
            cols = [keys, batch.labels.tolist(), preds.tolist()]
            if self._names:
                cols.append([self._names[p] for p in cols[2]])
            self._finish(batch, [form % v for v in zip(*cols, conf, lat)], batch.arrived, now)
            return
        preds, labels = preds.tolist(), batch.labels.tolist()
        tail = _tail(extra)
        tally = self.by_answerer.setdefault(answerer(rank, extra), [0, 0])
        lines, fresh = [], []
        for i, idx in enumerate(keys):
            if idx in self.answered:
                self.duplicates += 1
                continue
            self.answered.add(idx)
            fresh.append(i)
            line = f'{{"index": {idx}'
            if batch.names is not None:
                line += f', "name": {json.dumps(batch.names[i])}'
            if labels[i] >= 0:
                self.labelled += 1
                self.correct += preds[i] == labels[i]
                tally[0] += 1
                tally[1] += preds[i] == labels[i]
                line += f', "label": {labels[i]}'
            named = f', "class": {self._names[preds[i]]}' if self._names else ""
            line += f', "pred": {preds[i]}{named}, "confidence": {conf[i]:.4f}, "rank": {rank}{tail}, "latency_ms": {lat[i]:.3f}'
            if self.with_logits:
                line += ', "logits": [' + ", ".join(f"{float(v):.6g}" for v in logits[i]) + "]"
            lines.append(line + "}")
        self._finish(batch, lines, batch.arrived[fresh], now)

    def _line_format(self, rank: int, extra: dict | None) -> str:
        """The %-format of one usual line for answers of ``rank`` with ``extra`` (made once, then cached)."""
        key = (rank, tuple((extra or {}).items()))
        form = self._forms.get(key)
        if form is None:
            named = ', "class": %s' if self._names else ""
            form = self._forms[key] = '{"index": %d, "label": %d, "pred": %d' + named + ', "confidence": %.4f, "rank": ' + \
                f"{rank}{_tail(extra)}".replace("%", "%%") + ', "latency_ms": %.3f}'
        return form

    def _finish(self, batch, lines: list[str], arrived: np.ndarray, now: float) -> None:
        self.latency.record_many(arrived, now)
        self.timeline.append((round(time.perf_counter() - self.t0, 4), len(batch)))
        if self.bar is not None:
            self.bar.update(len(batch))
        self._append(lines)

    def write_errors(self, errors: list[tuple[int, str, str]]) -> None:
        """One line per input that could not be read: ``{"index", "name", "error"}`` (its answer)."""
        lines = []
        for key, name, error in errors:
            if key in self.answered:
                self.duplicates += 1
                continue
            self.answered.add(key)
            self.errors += 1
            lines.append(json.dumps({"index": key, "name": name, "error": error}))
        self._append(lines)

    def _append(self, lines: list[str]) -> None:
        if self._fh is not None and lines:
            self._fh.write("\n".join(lines) + "\n")
            self._fh.flush()  # a dead process loses nothing
            now = time.monotonic()
            if now - self._synced >= FSYNC_INTERVAL_S:
                self._syncer.request()
                self._synced = now

    def sync(self) -> None:
        """Make everything written so far durable, now (also called at close)."""
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def settled(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the fsyncs asked of the helper thread; True when none is pending."""
        return self._syncer is None or self._syncer.settled(timeout)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self._fh is not None:
            self._syncer.stop()
            self.sync()
            self._fh.close()
            self._fh = None
