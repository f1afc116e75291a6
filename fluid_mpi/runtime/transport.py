"""The transport interface the runtime loops are written against, and the one recovery path.

:class:`Transport` is implemented by :class:`~fluid_mpi.runtime.mpi_transport.MpiTransport` (ULFM over
mpi4py) and by the tests' fake (``tests/fake_transport.py``), so the coordinator, worker and sliced loops
are unit-tested without MPI. Ranks: ``rank``/``size`` are positions in the current (possibly shrunk)
communicator, ``members[i]`` the world rank at position ``i``.

:func:`recover` is the only recovery path, used by every loop: kill what this host can see is frozen (a
shrink waits for every live process), then revoke and shrink within a deadline. It returns the world
ranks lost, or raises :class:`~fluid_mpi.errors.RecoveryFailed` -- never blocks forever.
"""
from __future__ import annotations

import time
from typing import Callable, Protocol

import numpy as np

from .exits import note_failure
from .liveness import Liveness, recovery_deadline


class Handle(Protocol):
    """A posted receive: ``header`` = ``[kind, batch, rows, extra, crc]``, ``payload`` the data."""

    header: np.ndarray
    payload: np.ndarray


class Transport(Protocol):
    """Messaging on a fault-tolerant communicator. Failed or revoked operations raise
    :class:`~fluid_mpi.errors.PeerFailure`."""

    members: list[int]

    @property
    def rank(self) -> int: ...

    @property
    def size(self) -> int: ...

    def world_rank(self, r: int | None = None) -> int: ...

    def send(self, dest: int, header: np.ndarray, payload: np.ndarray) -> None:
        """Non-blocking send of (header, payload) to position ``dest``."""

    def recv_start(self, source: int, max_items: int, dtype=np.float32, row: int | None = None) -> Handle:
        """Post the receive of the next message from position ``source`` (rows of ``row`` items, or of
        ``header[3]`` items when None)."""

    def ready(self, handle: Handle) -> bool:
        """True once the message arrived whole; raises PeerFailure when its sender failed."""

    def wait(self, handle: Handle, timeout: float) -> bool:
        """Poll until the message arrived (True) or ``timeout`` seconds passed (False)."""

    def flush_sends(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for outstanding sends; True when all completed."""

    def bcast(self, buf: np.ndarray, timeout: float, on_stall: Callable[[], bool] | None = None) -> np.ndarray:
        """Broadcast from position 0. After ``timeout`` s, ``on_stall()`` is asked: keep waiting when it
        returns True, else TimeoutError."""

    def allgather(self, mine: np.ndarray, timeout: float,
                  on_stall: Callable[[], bool] | None = None) -> np.ndarray: ...

    def gather(self, mine: np.ndarray, timeout: float,
               on_stall: Callable[[], bool] | None = None) -> np.ndarray | None: ...

    def shrink(self, timeout: float) -> list[int]:
        """Revoke and shrink to the survivors within ``timeout`` s; returns the world ranks lost, or raises
        RecoveryFailed."""

    def revoke(self) -> None:
        """Revoke without shrinking (a run that stops: wakes every rank waiting on the communicator)."""


class Backoff:
    """Polling rhythm: spin briefly (low latency), then sleep in growing steps (leave the core to the
    workers; MPI_NOTES measured blocking receives burning 57-100 % of a core)."""

    # 200 spins (~tens of µs) catch a reply that is about to land; sleeps then grow to 0.5 ms, a sixth of
    # one batch-64 step (~3 ms), so an idle loop adds at most that to a reply's latency.
    def __init__(self, spins: int = 200, max_sleep: float = 5e-4):
        self.spins, self.max_sleep, self.n = spins, max_sleep, 0

    def reset(self) -> None:
        self.n = 0

    def pause(self) -> None:
        self.n += 1
        if self.n > self.spins:
            time.sleep(min(self.max_sleep, 2e-5 * (self.n - self.spins)))


def recover(t: Transport, liveness: Liveness, rank_timeout: float, events=None) -> list[int]:
    """The one recovery path (see the module docstring): the shrink may take
    :func:`~fluid_mpi.runtime.liveness.recovery_deadline` of ``rank_timeout``. ``events``: an EventLog
    for ``recovered``."""
    note_failure()
    t0 = time.monotonic()
    me = t.world_rank()
    killed = liveness.kill_stopped([w for w in t.members if w != me])
    if events is not None:
        for w in killed:
            events.emit("kill", rank=w, host=liveness.host(w), pid=liveness.hosts[w][1],
                        reason="stopped process found during recovery")
    before = len(t.members)
    lost = t.shrink(recovery_deadline(rank_timeout))
    if events is not None:
        events.emit("recovered", lost=lost, ranks=len(t.members), was=before,
                    recovery_ms=round(1000 * (time.monotonic() - t0), 1))
    return lost
