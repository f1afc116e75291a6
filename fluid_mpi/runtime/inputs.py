"""The coordinator's inputs: what arrives, when, and how it is cut into batches.

An :class:`InputStream` replays arrays (the MNIST test split, a folder of the user's images or a ``.npy``)
at once or as a Poisson stream of ``--rate`` images/s; a :class:`LiveStream` takes image paths on stdin as
they come. Both keep the **backlog**: inputs that arrived and were not yet handed out. :meth:`InputStream.take` cuts the next batch from it without waiting for a full one (an input
that arrived waits for no other). Each input has a ``key`` (its index in the data set, folder or array; its
arrival number on stdin), which is the ``index`` of its prediction line and what ``--resume`` skips.

Latency runs from an input's arrival. Inputs replayed without ``--rate`` all "arrive" at once, so for them
latency runs from when their batch is handed out (a closed loop: the cluster takes inputs as fast as it
answers them) — otherwise it would measure the queue, not the cluster.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np

from .arrivals import Item, ReplaySource, Source, StdinSource, parse_rate, schedule_offsets

# With an empty backlog and inputs still to arrive, wait at most 1 ms for them: a fraction of one batch's
# compute, so an arrival waits little, yet an idle coordinator leaves the core to the workers.
ARRIVAL_WAIT_S = 0.001


@dataclass
class Batch:
    """Inputs handed out together. ``labels`` is -1 where unknown (the user's own images)."""

    bid: int
    keys: np.ndarray
    images: np.ndarray
    labels: np.ndarray
    arrived: np.ndarray  # per input, monotonic seconds; latency runs from here
    names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.keys)


class InputStream:
    """Replayed inputs (arrays) turned into batches: input i arrives at ``source.due[i]``; the backlog is
    the arrived inputs not yet handed out (a cursor, no per-input objects: the closed loop of a data set
    must cost the coordinator nothing). ``closed_loop``: latency from hand-out, not arrival."""

    def __init__(self, source: ReplaySource, keys: np.ndarray, labels: np.ndarray | None, names: list[str] | None,
                 closed_loop: bool, total: int | None, description: str):
        self.source, self.keys, self.names = source, keys, names
        self.labels = labels if labels is not None else np.full(len(keys), -1, np.int64)
        self.closed_loop, self.total, self.description = closed_loop, total, description
        self.errors: list[tuple[int, str, str]] = []  # (key, name, error) of inputs that could not be read
        self._bids = itertools.count()
        self.taken = self.arrived = 0  # inputs handed out / arrived so far
        self.max_backlog = 0

    @classmethod
    def replay(cls, images: np.ndarray, labels: np.ndarray, keys: np.ndarray) -> "InputStream":
        """Arrays available at once, in order (a closed loop; tests and in-process use)."""
        source = ReplaySource(images, map(str, keys), np.zeros(len(keys)), time.monotonic())
        return cls(source, np.asarray(keys), np.asarray(labels), None, True, len(keys), "arrays")

    def start(self, now: float | None = None) -> None:
        """The run starts now: arrival times count from here (loading the model and the inputs is not
        the inputs' wait)."""
        self.source.restart(time.monotonic() if now is None else now)

    def poll(self, now: float | None = None) -> int:
        """Note what has arrived by ``now``; returns how many inputs arrived since the last poll."""
        before, self.arrived = self.arrived, self.source.arrived_by(time.monotonic() if now is None else now)
        self.max_backlog = max(self.max_backlog, self.backlog)
        return self.arrived - before

    @property
    def backlog(self) -> int:
        return self.arrived - self.taken

    def oldest_wait(self, now: float) -> float:
        """Seconds the oldest input in the backlog has waited (0 when none)."""
        if not self.backlog or self.closed_loop:
            return 0.0
        return max(0.0, now - float(self.source.due[self.taken]))

    def take(self, n: int) -> Batch | None:
        """The next batch of at most ``n`` inputs from the backlog (None when it is empty)."""
        if not self.backlog:
            return None
        lo, hi = self.taken, min(self.arrived, self.taken + n)
        self.taken = hi
        arrived = np.full(hi - lo, time.monotonic()) if self.closed_loop else self.source.due[lo:hi]
        return Batch(next(self._bids), self.keys[lo:hi], self.source.images[lo:hi], self.labels[lo:hi], arrived,
                     self.names[lo:hi] if self.names is not None else None)

    def finished(self) -> bool:
        """Nothing left to arrive and nothing in the backlog."""
        return self.taken >= len(self.keys)

    def wait(self, timeout: float) -> None:
        """Block until the next input is due (at most ``timeout`` s); only called with an empty backlog."""
        self.source.wait(timeout)


class LiveStream:
    """Inputs that come as they come (image paths on stdin): the same interface as :class:`InputStream`,
    over the :class:`~fluid_mpi.runtime.arrivals.Item` s of a source; keys are arrival numbers."""

    def __init__(self, source: Source, description: str):
        self.source, self.description, self.total = source, description, None
        self._items: list[Item] = []  # arrived, readable, not handed out
        self.errors: list[tuple[int, str, str]] = []
        self._bids = itertools.count()
        self.max_backlog = 0

    def start(self, now: float | None = None) -> None:
        """Arrivals are stamped by the reader as they come: nothing to shift."""

    def poll(self, now: float | None = None) -> int:
        items = self.source.poll(time.monotonic() if now is None else now)
        for item in items:
            if item.error is not None:
                self.errors.append((item.key, item.name, item.error))
            else:
                self._items.append(item)
        self.max_backlog = max(self.max_backlog, len(self._items))
        return len(items)

    @property
    def backlog(self) -> int:
        return len(self._items)

    def oldest_wait(self, now: float) -> float:
        return max(0.0, now - self._items[0].arrived) if self._items else 0.0

    def take(self, n: int) -> Batch | None:
        if not self._items:
            return None
        items, self._items = self._items[:n], self._items[n:]
        return Batch(next(self._bids), np.array([i.key for i in items], np.int64), np.stack([i.image for i in items]),
                     np.full(len(items), -1, np.int64), np.array([i.arrived for i in items]),
                     [i.name for i in items])

    def finished(self) -> bool:
        return not self._items and self.source.exhausted()

    def wait(self, timeout: float) -> None:
        self.source.wait(timeout)


def open_inputs(opts, skip: set[int], meta: dict | None = None, ds_loader=None) -> InputStream:
    """The inputs of a run from its options: ``--input PATH`` (a folder, a ``.npy`` or ``-`` for stdin),
    else the test split of a labelled data set (``--data``/``--data-dir``, ``--limit``, ``--repeat``);
    ``--rate``/``--seed`` replay them as a Poisson stream. ``skip``: keys already answered (``--resume``,
    take-over). ``meta``: the checkpoint's, whose input spec says how pictures are prepared."""
    from ..model.spec import InputSpec

    spec = InputSpec.from_dict((meta or {}).get("input"))
    if opts.input == "-":
        import functools
        import sys

        from ..model.images import decode_file

        return LiveStream(StdinSource(sys.stdin, functools.partial(decode_file, spec=spec)), "image paths from stdin")
    if opts.input:
        from ..model.images import load_inputs

        inputs = load_inputs(opts.input, spec)
        images, names, labels = inputs.images, list(inputs.names), None
        description = f"{opts.input} ({len(names)} readable images, {len(inputs.errors)} unreadable)"
        bad = list(inputs.errors)
    else:
        from ..model.data import load_split
        from ..model.evaluate import check_shape

        if ds_loader is None:
            shape = (spec.channels, spec.height, spec.width)
            ds = load_split(opts.data_dir, "test", shape=shape, test_fraction=(meta or {}).get("test_fraction"))
        else:
            ds = ds_loader(opts.data_dir, "test")
        ds = ds.take(opts.limit)
        check_shape(spec, ds)
        images, labels, names, bad = ds.images, ds.labels, None, []
        if opts.repeat > 1:  # input i of pass p is input p * n + i: distinct, answered once each
            images = np.tile(images, (opts.repeat,) + (1,) * (images.ndim - 1))
            labels = np.tile(labels, opts.repeat)
        description = ds.source + (f", {opts.repeat} passes" if opts.repeat > 1 else "")
    keys = np.arange(len(images), dtype=np.int64)
    if names is not None:  # a folder's keys follow the sorted file names, unreadable files included
        order = {name: k for k, name in enumerate(sorted(names + [n for n, _ in bad]))}
        keys = np.array([order[n] for n in names], dtype=np.int64)
        bad = [(order[n], n, e) for n, e in bad]
    keep = ~np.isin(keys, np.fromiter(skip, np.int64, len(skip))) if skip else np.ones(len(keys), bool)
    idx = np.nonzero(keep)[0]
    kept_names = [names[i] for i in idx] if names is not None else None
    offsets = schedule_offsets(len(idx), parse_rate(opts.rate), opts.seed)
    source = ReplaySource(images[idx], kept_names or [""] * len(idx), offsets, time.monotonic())
    stream = InputStream(source, keys[idx], labels[idx] if labels is not None else None, kept_names,
                         not opts.rate, len(keys) + len(bad), description)
    stream.errors = [(k, n, e) for k, n, e in bad if k not in skip]
    return stream
