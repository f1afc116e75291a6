"""What an emulated host may use: its CPU quota (``slow``), its cores (``pin``) and whether it runs at all
(``freeze``), through its cgroup v1 directories ``fluid-mpi-NAME/HOST`` under each of :data:`CONTROLLERS`.
A mixin of :class:`~fluid_mpi.vcluster.emulator.VCluster`, which makes the directories and the hosts."""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Callable

from .links import VClusterError

CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("cpu", "freezer", "cpuset")
SETTLE_TIMEOUT, POLL = 5.0, 0.05  # killed tasks vanish, a FREEZING cgroup turns FROZEN, well within a second


def settle(done: Callable[[], bool]) -> bool:
    """Poll ``done`` until it holds or :data:`SETTLE_TIMEOUT` passes; its last answer."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while not done() and time.monotonic() < deadline:
        time.sleep(POLL)
    return done()


class HostLimits:
    """``freeze``, ``slow`` and ``pin`` of a virtual cluster's hosts (needs the cluster's ``require``,
    ``cgroup``, ``pids`` and ``_set``)."""

    def _knob(self, host: str, ctl: str, knob: str) -> Path:
        # adopts every process of the host into the cgroup first (those started without the agent too)
        self.require(host)
        path = self.cgroup(ctl, host) / knob
        if not path.exists():
            raise VClusterError(f"cgroup v1 {ctl} controller not available at {CGROUP_ROOT / ctl}")
        for pid in self.pids(host):
            with contextlib.suppress(OSError):
                (path.parent / "cgroup.procs").write_text(str(pid))
        return path

    def freeze(self, host: str, frozen: bool = True) -> None:
        """Stop (``frozen``) or continue every process in the host (cgroup v1 freezer: later ones too)."""
        path = self._knob(host, "freezer", "freezer.state")
        path.write_text(want := "FROZEN" if frozen else "THAWED")
        if not settle(lambda: path.read_text().strip() == want):  # FREEZING until every task has stopped
            raise VClusterError(f"{host} did not reach {want} within {SETTLE_TIMEOUT:g} s")

    def slow(self, host: str, cpus: float, period_ms: float | None = None) -> None:
        """Limit the host to ``cpus`` CPUs (CFS quota = cpus x period); 0 lifts the limit. ``period_ms``: the
        quota's period (the kernel's default is 100 ms). Within each period the host runs at full speed
        until its quota is spent, then stops for the rest: at 100 ms and 0.5 CPU, 50 ms on and 50 ms off,
        a device that stalls rather than a slower one. A short period (10 ms) makes it evenly slower; it is
        lengthened where the quota would fall below the kernel's minimum of 1 ms."""
        path = self._knob(host, "cpu", "cpu.cfs_quota_us")
        if period_ms and cpus:
            period_us = max(int(period_ms * 1000), math.ceil(1000 / cpus))
            (path.parent / "cpu.cfs_period_us").write_text(str(period_us))
        period = int((path.parent / "cpu.cfs_period_us").read_text())
        path.write_text(str(max(1000, int(cpus * period)) if cpus else -1))  # the kernel's minimum quota: 1 ms
        self._set(host, cpus=cpus or None)

    def pin(self, host: str, cores: str | None) -> None:
        """Run the host's processes on ``cores`` only (cpuset list, e.g. ``"1"`` or ``"0-1"``), as a board
        has cores of its own; None: on all of the machine's. (On a 2-core machine it did not make the
        uneven bench's measurements repeat: docs/vcluster.md.)"""
        path = self._knob(host, "cpuset", "cpuset.cpus")
        try:
            path.write_text(cores if cores is not None else (path.parent.parent / "cpuset.cpus").read_text())
        except OSError as exc:  # EINVAL: not a core of this machine
            raise VClusterError(f"cannot pin {host} to cores {cores!r}: {exc.strerror}") from None
        self._set(host, cores=cores)
