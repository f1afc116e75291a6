"""The MPI transport: the only module that imports mpi4py.

One small class over a communicator implementing :class:`~fluid_mpi.runtime.transport.Transport`; the
runtime loops (``coordinator.py``, ``worker.py``, ``sliced.py``) take it as a parameter and never touch
MPI themselves, so they are unit-tested with a fake transport.

Failure handling (ULFM, Open MPI 5): the working communicator is a ``Dup`` of WORLD with
``MPI.ERRORS_RETURN``; a failed or revoked operation raises :class:`~fluid_mpi.errors.PeerFailure`;
:meth:`MpiTransport.shrink` revokes and shrinks within a deadline (called by ``transport.recover``).
Waiting is ``Test`` + a short sleep (never a blocking call that burns a core or cannot time out).
"""
from __future__ import annotations

import os
import socket
import threading
import time
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
from mpi4py import MPI

from ..errors import PeerFailure, RecoveryFailed
from .transport import Backoff

HDR = 5  # header: four int64 fields of the protocol + the payload's CRC-32
TAG_HDR, TAG_PAY = 11, 12
_FAILURE_CLASSES = {getattr(MPI, n) for n in ("ERR_PROC_FAILED", "ERR_PROC_FAILED_PENDING", "ERR_REVOKED")
                    if hasattr(MPI, n)}


def ft_enabled() -> bool:
    """True when Open MPI's ULFM support is switched on for this process (``--with-ft ulfm``, the
    environment, or an MCA parameter file -- ``scripts/setup.sh`` writes the venv's)."""
    if "OMPI_MCA_mpi_ft_enable" in os.environ:  # the environment overrides the files
        return os.environ["OMPI_MCA_mpi_ft_enable"].strip().lower() in ("1", "true", "yes")
    files = [Path.home() / ".openmpi" / "mca-params.conf"]
    if os.environ.get("OPAL_PREFIX"):
        files.append(Path(os.environ["OPAL_PREFIX"]) / "etc" / "openmpi-mca-params.conf")
    for f in files:
        try:
            for line in f.read_text().splitlines():
                key, _, value = line.partition("=")
                if key.strip() == "mpi_ft_enable" and value.strip().lower() in ("1", "true", "yes"):
                    return True
        except OSError:
            continue
    return False


class Handle:
    """A posted receive of (header, payload) from one source."""

    def __init__(self, source: int, header: np.ndarray, payload: np.ndarray, reqs: list, row: int | None):
        self.source, self.header, self.payload, self.reqs = source, header, payload, reqs
        self.row = row  # items per row; None: the sender says so in header[3]
        self.statuses = [MPI.Status(), MPI.Status()]
        self.done = [False, False]

    @property
    def payload_status(self):
        return self.statuses[1]


class MpiTransport:
    """Point-to-point and collective messaging on a fault-tolerant communicator."""

    def __init__(self) -> None:
        world = MPI.COMM_WORLD
        self.world_size = world.Get_size()
        self.comm = world.Dup()
        self.comm.Set_errhandler(MPI.ERRORS_RETURN)
        self.members = list(range(self.world_size))  # world rank of each rank of self.comm
        self._sends: list = []
        self._graveyard: list = []
        self.backoff = Backoff()

    # --- who is who -------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.comm.Get_rank()

    @property
    def size(self) -> int:
        return self.comm.Get_size()

    def world_rank(self, r: int | None = None) -> int:
        return self.members[self.rank if r is None else r]

    def host_info(self, error: str | None = None) -> list[tuple[str, int, str | None]]:
        """(hostname, pid, start-up error or None) of every rank, on every rank (start-up only)."""
        return self._call(self.comm.allgather, (socket.gethostname(), os.getpid(), error))

    # --- error mapping ----------------------------------------------------------------------------
    def _call(self, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except MPI.Exception as exc:
            if exc.Get_error_class() not in _FAILURE_CLASSES:
                raise
            raise PeerFailure(f"MPI error class {exc.Get_error_class()}: {exc}", self.failed_world_ranks()) \
                from None

    def failed_world_ranks(self) -> tuple[int, ...]:
        try:
            group = self.comm.Get_failed()
            ranks = MPI.Group.Translate_ranks(group, list(range(group.Get_size())), self.comm.Get_group())
            return tuple(sorted(self.members[r] for r in ranks if r != MPI.UNDEFINED))
        except (MPI.Exception, AttributeError, NotImplementedError):
            return ()

    # --- point to point ---------------------------------------------------------------------------
    def send(self, dest: int, header: np.ndarray, payload: np.ndarray) -> None:
        """Non-blocking send of header then payload (any numpy dtype the receiver expects); buffers are
        kept alive until done."""
        self._sends = [s for s in self._sends if not self._done(s[0])]
        payload = np.ascontiguousarray(payload)
        header = np.append(np.asarray(header, dtype=np.int64)[:HDR - 1], zlib.crc32(payload))
        reqs = [self._call(self.comm.Isend, header, dest, TAG_HDR),
                self._call(self.comm.Isend, payload, dest, TAG_PAY)]
        self._sends.append((reqs, header, payload))

    def flush_sends(self, timeout: float) -> bool:
        """Wait (bounded) for outstanding sends; True when all completed."""
        end = time.monotonic() + timeout
        while self._sends and time.monotonic() < end:
            self._sends = [s for s in self._sends if not self._done(s[0])]
            if self._sends:
                self.backoff.pause()
        return not self._sends

    def recv_start(self, source: int, max_items: int, dtype=np.float32, row: int | None = None) -> Handle:
        """Post the receive of the next (header, payload) from ``source``: payload up to ``max_items``,
        expected to hold ``header[2]`` rows of ``row`` items (``row`` None: ``header[3]`` items, as in
        a worker's reply, whose rows are features or logits)."""
        header = np.zeros(HDR, dtype=np.int64)
        payload = np.empty(max_items, dtype=dtype)
        reqs = [self._call(self.comm.Irecv, header, source, TAG_HDR),
                self._call(self.comm.Irecv, payload, source, TAG_PAY)]
        return Handle(source, header, payload, reqs, row)

    def ready(self, handle: Handle) -> bool:
        """True once both parts of the message arrived; raises PeerFailure if the source failed.

        A sender that dies mid-transfer was seen to complete the payload receive with no error, the
        right byte count and wrong data (uninitialised floats, about 1 run in 8 of `--kill-how raise`
        on shared memory), so every payload carries a CRC-32; a damaged message counts as the
        sender's failure."""
        for i, req in enumerate(handle.reqs):
            # a completed request is tested no more: testing it again would blank its status
            if not handle.done[i]:
                handle.done[i] = self._call(req.Test, handle.statuses[i])
        if not all(handle.done):
            return False
        n = int(handle.header[2])  # both directions: [kind, batch, rows, extra, crc]
        row = int(handle.header[3]) if handle.row is None else handle.row
        size = n * row * handle.payload.itemsize
        if handle.payload_status.Get_count(MPI.BYTE) != size or \
                zlib.crc32(handle.payload.view(np.uint8)[:size]) != int(handle.header[HDR - 1]):
            raise PeerFailure(f"damaged message from rank {self.members[handle.source]}",
                              (self.members[handle.source],))
        return True

    def _done(self, reqs: list) -> bool:
        # one Test per request: Testall reports a peer's failure only as MPI_ERR_IN_STATUS
        return all([self._call(r.Test) for r in reqs])

    def wait(self, handle: Handle, timeout: float) -> bool:
        """Poll until the message arrived (True) or ``timeout`` seconds passed (False)."""
        end = time.monotonic() + timeout
        self.backoff.reset()
        while not self.ready(handle):
            if time.monotonic() > end:
                return False
            self.backoff.pause()
        return True

    # --- collectives (non-blocking + polling, so they can time out) --------------------------------
    def _complete(self, req, timeout: float, on_stall: Callable[[], bool] | None) -> None:
        """Poll a collective. After ``timeout`` seconds ask ``on_stall`` (e.g. kill a frozen rank); keep
        waiting if it returned True, else raise TimeoutError."""
        end = time.monotonic() + timeout
        self.backoff.reset()
        while not self._call(req.Test):
            if time.monotonic() > end:
                if on_stall is None or not on_stall():
                    raise TimeoutError("collective did not complete in time")
                end = time.monotonic() + timeout
            self.backoff.pause()

    def bcast(self, buf: np.ndarray, timeout: float, on_stall: Callable[[], bool] | None = None) -> np.ndarray:
        self._complete(self._call(self.comm.Ibcast, buf, 0), timeout, on_stall)
        return buf

    def allgather(self, mine: np.ndarray, timeout: float,
                  on_stall: Callable[[], bool] | None = None) -> np.ndarray:
        mine = np.ascontiguousarray(mine, dtype=np.float32)
        out = np.empty((self.size,) + mine.shape, dtype=np.float32)
        self._complete(self._call(self.comm.Iallgather, mine, out), timeout, on_stall)
        return out

    def gather(self, mine: np.ndarray, timeout: float,
               on_stall: Callable[[], bool] | None = None) -> np.ndarray | None:
        mine = np.ascontiguousarray(mine, dtype=np.float32)
        out = np.empty((self.size,) + mine.shape, dtype=np.float32) if self.rank == 0 else None
        self._complete(self._call(self.comm.Igather, mine, out, 0), timeout, on_stall)
        return out

    # --- recovery (callers use transport.recover, the one recovery path) ---------------------------
    def shrink(self, timeout: float) -> list[int]:
        """Revoke, then shrink to the survivors within ``timeout`` seconds; returns the world ranks lost.

        The shrink runs in a helper thread (MPI is initialised with THREAD_MULTIPLE and this thread makes
        no MPI call meanwhile) because ``Ishrink`` failed with MPI_ERR_INTERN in Open MPI 5.0.11 here and a
        blocking ``Shrink`` waits forever for a live process that takes no part (a frozen rank). On
        timeout this raises RecoveryFailed; the caller stops and ends the process, thread included."""
        try:
            self.comm.Revoke()
        except MPI.Exception:
            pass  # already revoked
        box: dict = {}

        def run() -> None:
            try:
                box["comm"] = self.comm.Shrink()
            except MPI.Exception as exc:
                box["error"] = exc

        helper = threading.Thread(target=run, name="fluid-mpi-shrink", daemon=True)
        helper.start()
        helper.join(timeout)
        if helper.is_alive():
            raise RecoveryFailed(f"the survivors could not agree within {timeout:g} s (a rank is frozen "
                                 "or unreachable)")
        if "error" in box:
            raise RecoveryFailed(f"shrink failed: {box['error']}")
        new = box["comm"]
        new.Set_errhandler(MPI.ERRORS_RETURN)
        ranks = MPI.Group.Translate_ranks(new.Get_group(), list(range(new.Get_size())), self.comm.Get_group())
        survivors = [self.members[r] for r in ranks]
        lost = sorted(set(self.members) - set(survivors))
        # requests on the revoked communicator may still touch their buffers: keep them referenced
        self._graveyard.extend(self._sends)
        self.comm, self.members, self._sends = new, survivors, []
        return lost

    def revoke(self) -> None:
        """Revoke without shrinking (a run that stops: wake every rank blocked on this communicator)."""
        try:
            self.comm.Revoke()
        except MPI.Exception:
            pass
