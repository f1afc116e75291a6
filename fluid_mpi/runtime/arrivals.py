"""Inputs arriving over time, and the latency they see (plain Python + numpy: no torch, no MPI).

- :func:`poisson_offsets` -- arrival times of a Poisson stream (``--rate R`` images/s, ``--seed``).
- A :class:`Source` hands the coordinator the :class:`Item` s that have arrived by a given time:
  :class:`ReplaySource` replays a data set, a folder or a ``.npy`` at those offsets; :class:`StdinSource`
  reads image paths from a stream (stdin) as they come, decoding each on a reader thread.

Every time is in seconds on one monotonic clock (``time.monotonic`` unless a test injects another).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol, TextIO

import numpy as np

from ..errors import DataError


def poisson_offsets(n: int, rate: float | None, seed: int) -> np.ndarray:
    """Arrival times (seconds from the start) of ``n`` inputs in a Poisson stream of ``rate`` per second:
    cumulative sums of exponential inter-arrival times (mean ``1/rate``) drawn with ``seed``, so the same
    seed gives the same stream. ``rate`` None or <= 0: all zeros (every input available at once)."""
    if rate is None or rate <= 0:
        return np.zeros(n, dtype=np.float64)
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.exponential(1.0 / rate, size=n))


def parse_rate(spec: str | float | None) -> list[tuple[float, float]] | None:
    """``--rate``: ``R`` (images/s throughout) or a step load ``R1@S1,R2@S2,...,Rn`` (R1 images/s for S1
    seconds, then R2 ..., the last rate for the rest). None: everything available at once."""
    if spec is None or spec == "":
        return None
    segments = []
    parts = str(spec).split(",")
    for i, part in enumerate(parts):
        rate, _, secs = part.partition("@")
        try:
            r, d = float(rate), (float(secs) if secs else float("inf"))
        except ValueError:
            raise DataError(f"--rate {spec!r}: expected R or R1@S1,R2@S2,...,Rn (images/s @ seconds)") from None
        if r <= 0 or d <= 0 or (d == float("inf") and i < len(parts) - 1):
            raise DataError(f"--rate {spec!r}: rates and durations must be > 0; only the last segment may "
                            "omit its duration")
        segments.append((r, d))
    return segments


def schedule_offsets(n: int, segments: list[tuple[float, float]] | None, seed: int) -> np.ndarray:
    """Arrival times of ``n`` inputs under a piecewise-constant Poisson rate (see :func:`parse_rate`): within
    each segment, exponential inter-arrival times of mean ``1/rate`` drawn with ``seed``; the last rate
    goes on until all ``n`` have arrived. None: all zeros."""
    if not segments:
        return np.zeros(n, dtype=np.float64)
    rng = np.random.default_rng(seed)
    out, t, start = [], 0.0, 0.0
    for i, (rate, duration) in enumerate(segments):
        end = start + duration if i < len(segments) - 1 else float("inf")
        while len(out) < n:
            t += rng.exponential(1.0 / rate)
            if t >= end:
                t = end  # the next segment's first gap is drawn from its own rate
                break
            out.append(t)
        start = end
    return np.asarray(out[:n], dtype=np.float64)


@dataclass
class Item:
    """One arrived input. ``key`` numbers the inputs of a run in arrival order (0, 1, ...); ``image`` is
    the model's uint8 input, or None with ``error`` saying why the input could not be read; ``arrived`` is the time
    it arrived (on the source's clock), from which its latency runs."""

    key: int
    name: str
    image: np.ndarray | None
    error: str | None
    arrived: float


class Source(Protocol):
    """Where inputs come from, over time."""

    def poll(self, now: float) -> list[Item]:
        """The items that have arrived by ``now`` and were not returned before, in arrival order."""

    def exhausted(self) -> bool:
        """True once every item has been returned by :meth:`poll` and no more can come."""

    def wait(self, timeout: float) -> None:
        """Block until an item may have arrived, or at most ``timeout`` seconds (when idle)."""


class ReplaySource:
    """Replays ``images`` (named ``names``) so that item i arrives at ``t0 + offsets[i]``; its
    ``arrived`` time is that scheduled time, so a late poll does not hide queueing latency."""

    def __init__(self, images: np.ndarray, names: Iterable[str], offsets: np.ndarray, t0: float,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic):
        self.images, self.names = images, list(names)
        self.due = t0 + np.asarray(offsets, dtype=np.float64)
        self.offset0 = float(offsets[0]) if len(offsets) else 0.0
        if not (len(self.images) == len(self.names) == len(self.due)):
            raise ValueError(f"{len(self.images)} images, {len(self.names)} names, {len(self.due)} offsets")
        if np.any(np.diff(self.due) < 0):
            raise ValueError("offsets must be non-decreasing")
        self.next = 0  # index of the first item not yet returned
        self._sleep, self._clock = sleep, clock

    def arrived_by(self, now: float) -> int:
        """How many items have arrived by ``now`` (returned by poll or not)."""
        return int(np.searchsorted(self.due, now, side="right"))

    def poll(self, now: float) -> list[Item]:
        end = self.arrived_by(now)
        items = [Item(i, self.names[i], self.images[i], None, float(self.due[i]))
                 for i in range(self.next, end)]
        self.next = max(self.next, end)
        return items

    def exhausted(self) -> bool:
        return self.next >= len(self.due)

    def restart(self, t0: float) -> None:
        """Count the arrival times from ``t0`` instead (before the first poll: the run starts now)."""
        self.due += t0 - (self.due[0] - self.offset0) if len(self.due) else 0.0

    def next_due(self) -> float | None:
        """When the next item arrives (None when exhausted)."""
        return None if self.exhausted() else float(self.due[self.next])

    def wait(self, timeout: float) -> None:
        due = self.next_due()
        pause = timeout if due is None else min(timeout, due - self._clock())
        if pause > 0:
            self._sleep(pause)


class StdinSource:
    """Image paths read line by line from ``stream`` (stdin) as they arrive; a daemon thread reads each
    line, stamps its arrival time with ``clock`` and decodes it with ``decode`` (a path -> the model's uint8 input,
    raising :class:`DataError` for a bad one: the item then carries ``error``). Blank lines are skipped;
    EOF ends the stream. An unexpected failure of the reader is re-raised by the next :meth:`poll`."""

    def __init__(self, stream: TextIO, decode: Callable[[str], np.ndarray] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if decode is None:
            from ..model.images import decode_file  # imported lazily: Pillow only when stdin is used
            decode = decode_file
        self._stream, self._decode, self._clock = stream, decode, clock
        self._ready: list[Item] = []
        self._cond = threading.Condition()
        self._eof = False
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._read, name="stdin-source", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        key = 0
        try:
            for line in self._stream:
                path = line.strip()
                if not path:
                    continue
                arrived = self._clock()
                try:
                    item = Item(key, path, self._decode(path), None, arrived)
                except DataError as exc:
                    item = Item(key, path, None, str(exc), arrived)
                key += 1
                with self._cond:
                    self._ready.append(item)
                    self._cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - handed to the polling thread, not lost here
            self._failure = exc
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def poll(self, now: float) -> list[Item]:
        with self._cond:
            if self._failure is not None:
                raise DataError(f"reading image paths from stdin failed ({self._failure})")
            n = 0
            while n < len(self._ready) and self._ready[n].arrived <= now:
                n += 1
            items, self._ready = self._ready[:n], self._ready[n:]
            return items

    def exhausted(self) -> bool:
        with self._cond:
            return self._eof and not self._ready and self._failure is None

    def wait(self, timeout: float) -> None:
        with self._cond:
            if not self._ready and not self._eof:
                self._cond.wait(timeout)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the reader thread to reach EOF (tests; the run itself only polls)."""
        self._thread.join(timeout)
