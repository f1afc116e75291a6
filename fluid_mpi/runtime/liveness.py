"""The one liveness policy: who is lost, and what may be killed.

- A peer is **lost** when, seen from its own host, its process is gone, a zombie or stopped (SIGSTOP: a
  frozen device), or when it held work past ``--rank-timeout`` (seen by the coordinator).
- A lost peer whose process may still exist is **killed out of band**, once: SIGKILL on this host, or
  through the launch agent on another (the one mpirun uses: ``PRTE_MCA_plm_ssh_agent``, else ssh). ULFM
  then reports the death and the survivors shrink it away -- ULFM cannot exclude a live process.
- A peer that cannot be killed, or whose death ULFM does not report within :data:`KILL_GRACE_S` (its host's
  daemon cannot reach mpirun: cable pulled, frozen board), is **silent**: in-job recovery is impossible and
  the run stops with exit 4 so that ``fluid-mpi launch`` relaunches without that host.

Plain Python (no MPI); the clock and the remote runner are parameters so the policy is unit-tested.
"""
from __future__ import annotations

import os
import signal
import socket
import time
from typing import Callable

from .remote import run_remote

# After a SIGKILL ULFM reported the death within ~50 ms on shared memory and ~3 ms over TCP (MPI_NOTES):
# 3 s without a report means the dead rank's daemon cannot reach mpirun (cable pulled, frozen host).
KILL_GRACE_S = 3.0
def process_state(pid: int) -> str:
    """State letter of process ``pid`` on this host from /proc ('' when it does not exist)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            stat = fh.read()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2:][:1]


class Liveness:
    """Applies the policy above to the ranks of one run (``hosts[world_rank] = (hostname, pid)``)."""

    def __init__(self, hosts: list[tuple[str, int]], here: str | None = None,
                 remote: Callable[[str, list[str]], bool] = run_remote,
                 local_kill: Callable[[int], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.hosts = dict(enumerate(hosts))
        self.here = socket.gethostname() if here is None else here
        self.remote, self.clock = remote, clock
        self.local_kill = local_kill or _sigkill
        self.killed: dict[int, float] = {}  # world rank -> when the kill was sent
        self.unkillable: set[int] = set()

    def host(self, rank: int) -> str:
        return self.hosts.get(rank, ("?", 0))[0]

    def state(self, rank: int) -> str:
        """'alive', 'gone', 'stopped' (on this host) or 'remote' (another host: not observable here)."""
        host, pid = self.hosts.get(rank, ("?", 0))
        if host != self.here or not pid:
            return "remote"
        letter = process_state(pid)
        if letter in ("", "Z", "X"):
            return "gone"
        return "stopped" if letter in ("T", "t") else "alive"

    def lost(self, rank: int) -> bool:
        """True when this host can see that ``rank`` is dead or frozen."""
        return self.state(rank) in ("gone", "stopped")

    def kill(self, rank: int) -> bool:
        """SIGKILL ``rank`` out of band (once). False when it could not be reached."""
        if rank in self.killed:
            return True
        if rank in self.unkillable:
            return False
        host, pid = self.hosts.get(rank, ("?", 0))
        if not pid:
            ok = False
        elif host == self.here:
            self.local_kill(pid)
            ok = True
        else:
            ok = self.remote(host, ["kill", "-9", str(pid)])
        if ok:
            self.killed[rank] = self.clock()
        else:
            self.unkillable.add(rank)
        return ok

    def kill_stopped(self, ranks: list[int]) -> list[int]:
        """Kill the ranks this host sees stopped (a shrink would wait for them forever)."""
        victims = [r for r in ranks if self.state(r) == "stopped"]
        for r in victims:
            self.kill(r)
        return victims

    def silent(self, members: list[int]) -> list[int]:
        """Members that could not be killed, or were killed longer than KILL_GRACE_S ago and are still
        members (ULFM never reported them): devices that in-job recovery cannot exclude."""
        now = self.clock()
        return sorted(r for r in members
                      if r in self.unkillable or (r in self.killed and now - self.killed[r] > KILL_GRACE_S))


def _sigkill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# A shrink takes 0.1-9 ms (MPI_NOTES), but seconds were seen on a loaded 2-core machine (a 1.5 s deadline
# gave up on a healthy shrink in CI): 5 s on top of --rank-timeout keeps such false give-ups away, while a
# frozen peer that takes no part still ends the wait in bounded time.
SHRINK_SLACK_S = 5.0


def recovery_deadline(rank_timeout: float) -> float:
    """How long the survivors may take to agree (shrink) before the run stops cleanly."""
    return rank_timeout + SHRINK_SLACK_S


def coordinator_silence_limit(rank_timeout: float) -> float:
    """How long a worker waits for a coordinator it cannot observe before it stops. The coordinator is
    silent to a worker at most while it notices a frozen peer (``rank_timeout``), kills it
    (``KILL_GRACE_S``) and shrinks (:func:`recovery_deadline`); one more ``rank_timeout`` is slack for
    loading data at start-up or after a take-over."""
    return 2 * rank_timeout + KILL_GRACE_S + recovery_deadline(rank_timeout)


def keepalive_interval(rank_timeout: float) -> float:
    """An idle coordinator (no inputs arriving) pings its workers this often, so that they never mistake
    a quiet stream for a lost coordinator: well within one ``rank_timeout`` of their silence checks."""
    return rank_timeout / 3
