"""How an MPI rank's process ends: the exit policy. A planned end skips ``MPI_Finalize`` when fault
tolerance is on (it can hang after a failure); an unplanned one (an uncaught exception, ``sys.exit``)
becomes SIGKILL, so the other ranks see a dead process instead of one stuck in ``MPI_Finalize``."""
from __future__ import annotations

import atexit
import os
import signal
import sys
import time

_planned = {"done": False, "failure_seen": False}

# Open MPI 5.0.11's launcher sometimes never exited when a survivor ended right after a peer's death
# (1 in 8 runs); half a second for it to settle made that 0 in 14.
SETTLE_AFTER_FAILURE_S = 0.5


def planned_exit(code: int, finalize: bool = False) -> None:
    """End the process. With fault tolerance on, skip ``MPI_Finalize`` (MPI_NOTES trap 3: it can hang
    after a failure; ULFM's mpirun then still exits 0). Without it, finalize normally: Open MPI's
    mpirun calls an exit without finalize abnormal."""
    _planned["done"] = True
    sys.stdout.flush()
    sys.stderr.flush()
    if finalize:
        sys.exit(code)
    if _planned["failure_seen"]:
        time.sleep(SETTLE_AFTER_FAILURE_S)
    os._exit(code)


def note_failure() -> None:
    """Called by the transport when it recovers from a failure (see planned_exit)."""
    _planned["failure_seen"] = True


def install_unplanned_exit_guard() -> None:
    """Turn an uncaught exception or ``sys.exit`` on an MPI rank into SIGKILL, so the other ranks see a
    dead process instead of one stuck in ``MPI_Finalize`` (MPI_NOTES trap 1)."""

    def guard() -> None:
        if not _planned["done"]:
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    previous = sys.excepthook

    def hook(kind, value, tb) -> None:
        previous(kind, value, tb)
        guard()

    sys.excepthook = hook
    atexit.register(guard)
