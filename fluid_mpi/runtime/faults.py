"""Deterministic fault injection for ``--kill-rank``: rank R dies after answering N batches.

How it dies (``--kill-how``):
- ``kill``  SIGKILL, a power cut (default);  ``term`` SIGTERM;  ``segv`` SIGSEGV;
- ``raise`` an uncaught exception, ``exit`` ``sys.exit(1)``: both would leave the rank hung in
  ``MPI_Finalize`` (MPI_NOTES trap 1), so :func:`install_unplanned_exit_guard` turns any unplanned exit
  into a SIGKILL -- a death ULFM can see;
- ``hang``  SIGSTOP: a frozen device that ULFM does not see; the coordinator's ``--rank-timeout`` catches it.
"""
from __future__ import annotations

import atexit
import os
import signal
import sys
import time
from dataclasses import dataclass

HOWS = ("kill", "term", "segv", "raise", "exit", "hang")


class InjectedFault(RuntimeError):
    """The exception thrown by ``--kill-how raise`` (never caught on purpose)."""


@dataclass(frozen=True)
class FaultPlan:
    """Which world ranks die, after how many answered batches, and how."""

    ranks: tuple[int, ...] = ()
    after: int | None = None  # None: halfway through this rank's expected share
    how: str = "kill"

    def after_for(self, expected_batches: int) -> int:
        return self.after if self.after is not None else max(0, expected_batches // 2)

    def should_die(self, world_rank: int, answered: int, expected_batches: int) -> bool:
        return world_rank in self.ranks and answered >= self.after_for(expected_batches)


def die(how: str) -> None:
    """Make this process die the requested way. Outputs are flushed first so the death is the only
    effect (a real power cut would lose unflushed buffers too, but then tests could not tell why)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif how == "segv":
        signal.signal(signal.SIGSEGV, signal.SIG_DFL)  # Python's faulthandler must not catch it
        os.kill(os.getpid(), signal.SIGSEGV)
    elif how == "hang":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif how == "raise":
        raise InjectedFault("injected fault: uncaught exception")
    elif how == "exit":
        sys.exit(1)
    raise ValueError(f"unknown --kill-how {how!r}")


_planned = {"done": False, "failure_seen": False}


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
        # Open MPI 5.0.11's launcher sometimes never exited when a survivor ended right after a peer's
        # death (1 in 8 runs); half a second for it to settle made that 0 in 14.
        time.sleep(0.5)
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


def process_state(pid: int) -> str:
    """State letter of process ``pid`` on this host from /proc ('' when it does not exist)."""
    try:
        stat = open(f"/proc/{pid}/stat", encoding="ascii").read()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2:][:1]


def frozen(pid: int) -> bool:
    """True when process ``pid`` on this host is stopped (SIGSTOP: state T or t in /proc)."""
    return process_state(pid) in ("T", "t")


def alive_checker(hosts: list[tuple[str, int]]):
    """``alive(world_rank)``: False only when that rank runs on this host and its process is gone, a
    zombie, or stopped (a frozen coordinator: the survivors then give up within seconds instead of
    waiting forever); ranks on other hosts are left to ULFM."""
    import socket

    me = socket.gethostname()

    def alive(world_rank: int) -> bool:
        host, pid = hosts[world_rank]
        return host != me or process_state(pid) not in ("", "Z", "X", "T", "t")

    return alive
