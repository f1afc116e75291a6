"""Deterministic fault injection for ``--kill-rank``: rank R dies after computing N batches of its own.

``--kill-rank R`` uses ``--kill-how`` / ``--kill-after``; ``--kill-rank R:HOW`` or ``R:HOW:AFTER`` gives that
rank its own fault, so tests can combine faults (``--kill-rank 1 --kill-rank 2:hang``).

How it dies:
- ``kill``  SIGKILL, a power cut (default);  ``term`` SIGTERM;  ``segv`` SIGSEGV;
- ``raise`` an uncaught exception, ``exit`` ``sys.exit(1)``: both would leave the rank hung in
  ``MPI_Finalize`` (MPI_NOTES trap 1), so :func:`install_unplanned_exit_guard` turns any unplanned exit
  into a SIGKILL -- a death ULFM can see;
- ``hang``  SIGSTOP: a frozen device that ULFM does not see; the liveness policy catches it;
- ``slow``  not a death: from then on the rank sleeps :data:`SLOW_BATCH_S` after each batch, a slow or
  throttled device (what ``--ha-deadline-ms`` is for).

:class:`FaultInjector` is the one place where a rank decides to die; every runtime loop calls its
:meth:`~FaultInjector.tick` after each batch it computed.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LaunchError

HOWS = ("kill", "term", "segv", "raise", "exit", "hang", "slow")
# A slow rank's pause per batch: ten times a small batch's forward here (~5 ms), so that it misses any
# deadline a test or a user would set for HA, yet answers well within --rank-timeout (not a lost device).
SLOW_BATCH_S = 0.05


class InjectedFault(RuntimeError):
    """The exception thrown by ``--kill-how raise`` (never caught on purpose)."""


@dataclass(frozen=True)
class Fault:
    how: str = "kill"
    after: int | None = None  # None: halfway through this rank's expected share


@dataclass(frozen=True)
class FaultPlan:
    """Which world ranks die, after how many batches of their own, and how."""

    faults: dict[int, Fault] = field(default_factory=dict)

    @classmethod
    def parse(cls, specs: tuple[str, ...] | list[str], how: str = "kill", after: int | None = None) -> "FaultPlan":
        """``R``, ``R:HOW`` or ``R:HOW:AFTER`` per spec; ``how``/``after`` are the defaults."""
        faults = {}
        for spec in specs:
            bits = str(spec).split(":")
            try:
                rank = int(bits[0])
                f_after = int(bits[2]) if len(bits) > 2 and bits[2] != "" else after
            except ValueError:
                raise LaunchError(f"--kill-rank {spec!r}: expected R, R:HOW or R:HOW:AFTER") from None
            f_how = bits[1] if len(bits) > 1 and bits[1] else how
            if rank < 0 or f_how not in HOWS or len(bits) > 3 or (f_after is not None and f_after < 0):
                raise LaunchError(f"--kill-rank {spec!r}: expected R, R:HOW or R:HOW:AFTER with HOW one of "
                                  f"{', '.join(HOWS)}")
            faults[rank] = Fault(f_how, f_after)
        return cls(faults)

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(sorted(self.faults))


class FaultInjector:
    """Counts the batches this rank computed and kills it when its planned fault is due."""

    def __init__(self, plan: FaultPlan, world_rank: int, stamp_dir: str):
        self.fault = plan.faults.get(world_rank)
        self.world_rank, self.stamp_dir = world_rank, stamp_dir
        self.computed = 0

    def tick(self, expected_batches: int) -> None:
        """One more batch computed here (its answer already handed on); die if the plan says so."""
        self.computed += 1
        f = self.fault
        if f is None:
            return
        after = f.after if f.after is not None else max(0, expected_batches // 2)
        if self.computed >= after and f.how == "slow":
            time.sleep(SLOW_BATCH_S)
        elif self.computed >= after:
            stamp_death(self.stamp_dir, self.world_rank, self.computed, f.how)
            die(f.how)


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
        return  # continued (SIGCONT): carry on as a slow rank would
    elif how == "raise":
        raise InjectedFault("injected fault: uncaught exception")
    elif how == "exit":
        sys.exit(1)
    raise ValueError(f"unknown --kill-how {how!r}")


def _stamp_path(stamp_dir: str, world_rank: int) -> Path:
    ns = "".join(c if c.isalnum() else "_" for c in os.environ.get("PMIX_NAMESPACE", "local"))
    return Path(stamp_dir) / f"fluid-mpi-death-{ns}-{world_rank}.json"


def stamp_death(stamp_dir: str, world_rank: int, after_batch: int, how: str) -> None:
    """The victim of an injected fault notes when it dies, so the coordinator can report how long
    detection took (possible when both see the same file system, as on one host)."""
    try:
        _stamp_path(stamp_dir, world_rank).write_text(
            json.dumps({"rank": world_rank, "t": time.time(), "after_batch": after_batch, "how": how}))
    except OSError:
        pass


def read_death(stamp_dir: str, world_rank: int) -> dict | None:
    """The victim's death note, removed once read; None when there is none (a real failure)."""
    path = _stamp_path(stamp_dir, world_rank)
    try:
        note = json.loads(path.read_text())
        path.unlink()
        return note
    except (OSError, ValueError):
        return None
