"""The coordinator's bookkeeping, in plain Python: which batch goes to which rank, what is in flight,
what to re-send after a failure, and which head or width survives. No MPI, no torch."""
from __future__ import annotations

import time
from collections import deque


class WorkQueue:
    """Batches waiting, in flight (per world rank, with send time) and answered. A batch is answered at
    most once; a failed rank's in-flight batches go back to the front of the queue."""

    def __init__(self, n_batches: int):
        self.pending: deque[int] = deque(range(n_batches))
        self.in_flight: dict[int, dict[int, float]] = {}  # world rank -> {batch: time sent}
        self.answered: set[int] = set()
        self.n_batches = n_batches

    def has_pending(self) -> bool:
        return bool(self.pending)

    def idle(self) -> bool:
        """Nothing in flight anywhere."""
        return not any(self.in_flight.values())

    def finished(self) -> bool:
        return len(self.answered) == self.n_batches

    def load(self, rank: int) -> int:
        return len(self.in_flight.get(rank, {}))

    def take(self, rank: int, now: float | None = None) -> int:
        batch = self.pending.popleft()
        self.in_flight.setdefault(rank, {})[batch] = time.monotonic() if now is None else now
        return batch

    def complete(self, rank: int, batch: int) -> bool:
        """Mark ``batch`` answered by ``rank``; False if it was not in flight there (a stale reply)."""
        if self.in_flight.get(rank, {}).pop(batch, None) is None or batch in self.answered:
            return False
        self.answered.add(batch)
        return True

    def requeue(self, rank: int) -> list[int]:
        """Put everything in flight on ``rank`` back at the front of the queue; returns those batches."""
        lost = sorted(self.in_flight.pop(rank, {}))
        self.pending.extendleft(reversed([b for b in lost if b not in self.answered]))
        return lost

    def requeue_all(self) -> list[int]:
        """After a shrink every message in flight may be lost: re-send all of it."""
        out = []
        for rank in list(self.in_flight):
            out += self.requeue(rank)
        self.pending = deque(sorted(set(self.pending)))
        return sorted(out)

    def overdue(self, timeout: float, now: float | None = None) -> list[int]:
        """World ranks holding a batch for longer than ``timeout`` seconds."""
        now = time.monotonic() if now is None else now
        return sorted(r for r, batches in self.in_flight.items()
                      if batches and now - min(batches.values()) > timeout)


def expected_share(n_batches: int, ranks: int, mode: str) -> int:
    """Batches one rank is expected to compute: all of them in HA and sliced runs, its share in HT (and
    auto, whose share depends on the load)."""
    return -(-n_batches // ranks) if mode in ("ht", "auto") else n_batches


def dynamic_width(alive_world_ranks: list[int], width: int) -> int:
    """Width a Dynamic DNN can still run: the longest prefix of slices 0..width-1 still alive
    (slice j lives on world rank j). 0 means slice 0 is gone and nothing can run."""
    alive = set(alive_world_ranks)
    w = 0
    while w < width and w in alive:
        w += 1
    return w


def fluid_subset(alive_world_ranks: list[int]) -> tuple[int, ...]:
    """Groups a Fluid HA head combines: group j lives on world rank j."""
    return tuple(sorted(alive_world_ranks))
