"""The coordinator's liveness policy for Fluid runs (as probe.py, a helper over a
:class:`~fluid_mpi.runtime.coordinator.FluidCoordinator`): which workers hold work past ``--rank-timeout``,
and what is done about them."""
from __future__ import annotations

import time

from ..errors import DeviceSilent
from .events import FaultKind
from .scheduler import overdue_workers


def overdue(coord, now: float) -> list[int]:
    """Workers holding work past the deadline: an HT batch, the oldest HA batch in flight, or with
    ``--ha-deadline-ms`` any HA batch sent to it (a batch answered without it may still be in its hands)."""
    if coord.deadline is not None:
        held = {w: {**coord.ht.get(w, {}), **coord.deadline.pending.get(w, {})} for w in coord.workers()}
        return overdue_workers(held, None, coord.workers(), now, coord.job.rank_timeout)
    oldest = next(iter(coord.ha), None)
    ha_oldest = None if oldest is None else (coord.ha_sent[oldest][0], coord.ha[oldest])
    return overdue_workers(coord.ht, ha_oldest, coord.workers(), now, coord.job.rank_timeout)


def enforce(coord, late: list[int]) -> None:
    """Kill the ``late`` workers out of band (ULFM then reports the death); raise :class:`DeviceSilent`
    for those that cannot be excluded."""
    for w in late:
        if w not in coord.liveness.killed and w not in coord.liveness.unkillable:
            ok = coord.liveness.kill(w)
            host, pid = coord.liveness.hosts.get(w, ("?", 0))
            coord.events.emit("kill", rank=w, host=host, pid=pid, delivered=ok,
                              reason=f"held a batch for more than {coord.job.rank_timeout:g} s")
    silent = coord.liveness.silent(coord.workers())
    if silent:
        hosts = sorted({coord.liveness.host(w) for w in silent})
        coord.tracker.lost(silent, time.time(), coord.last_contact, None, fault=FaultKind.SILENT)
        raise DeviceSilent(f"rank(s) {silent} on {', '.join(hosts)} silent and could not be excluded "
                           "in-job; relaunch without them (fluid-mpi launch does)", silent, hosts)
