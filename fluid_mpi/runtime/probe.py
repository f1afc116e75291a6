"""The start-up probe of ``--mode auto``: blank batches timed through the real path (messages, every rank's
sub-network, the head), before the first input arrives, for the policy's first capacity estimates.

The in-process warm-up timing (``roles.measure_rates``) sees one sub-network on an idle core: it put HA at
13-21k images/s where the cluster answered at most 8.7k (docs/adaptive-results.md). The probe
times what a batch really costs: HA (every rank computes its group's features, the coordinator applies the
head; timed as the coordinator's busy time, HA's busiest stage) at a full and at a quarter batch, which
gives the per-batch overhead and the per-image time of :class:`~fluid_mpi.runtime.capacity.Capacity`; HT
(every rank classifies a full batch of its own) at a full batch. Its first, untimed round also opens the
MPI connections and torch's kernels for the full batch size, which would otherwise stall the first inputs.

The workers serve the probe's batches as any other (``--kill-after`` counts them);
the probe's batch ids are negative, so a reply that comes after the probe gave up is ignored as stale.
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from ..errors import PeerFailure
from .capacity import Capacity
from .inputs import Batch
from .protocol import CMD_FEATURES, CMD_LOGITS

# Timed rounds per (mode, size), median taken: 3 survive one round slowed by a context switch on a shared
# core (4-10 ms, as long as the batch itself), and the whole probe stays ~10 exchanges (~50-100 ms on 2 cores).
ROUNDS = 3
# The smaller timed size is a quarter batch: far enough from the full batch for the line's slope to stand
# out of the timing noise, large enough to be computed like a batch rather than a single image.
PART = 0.25


def _blank(n: int, shape: tuple[int, ...]) -> Batch:
    return Batch(-1, np.zeros(n, np.int64), np.zeros((n, *shape), np.uint8), np.full(n, -1, np.int64),
                 np.zeros(n))


def _round(coord, mode: str, n: int) -> float | None:
    """One exchange of a blank batch of ``n`` in ``mode``; its seconds, or None when a worker did not answer
    within ``rank_timeout`` (the run's liveness policy deals with it afterwards). HA's seconds are the
    coordinator's busy time (the wait for the workers' features left out, as the live
    :class:`~fluid_mpi.runtime.capacity.ServiceClock` does); HT's are the exchange's latency."""
    b = _blank(n, coord.part.spec.image_shape)
    t0 = time.monotonic()
    waited = 0.0
    for w in coord.workers():
        coord.send(w, b, CMD_FEATURES if mode == "ha" else CMD_LOGITS)
    mine = coord.compute(b, features=mode == "ha")
    feats, pending = {coord.me: mine}, set(coord.workers())
    while pending:
        t_pass = time.monotonic()
        if t_pass - t0 > coord.job.rank_timeout:
            return None
        for w in sorted(pending):
            h = coord.handles[w]
            if coord.t.ready(h):
                if int(h.header[0]) == CMD_FEATURES and int(h.header[1]) == b.bid:
                    dim = coord.part.widths.hidden
                    feats[w] = torch.from_numpy(h.payload[:n * dim].reshape(n, dim).copy())
                coord.last_contact[w] = time.time()
                coord.post(w)
                pending.discard(w)
        if pending:
            coord.idle.pause()
            waited += time.monotonic() - t_pass
    coord.idle.reset()
    if mode == "ht":
        return time.monotonic() - t0
    with torch.inference_mode():
        coord.part.bank.logits(feats, coord.job.combine)
    return time.monotonic() - t0 - waited


def probe(coord) -> tuple[Capacity, float] | None:
    """HA's :class:`Capacity` and HT's images/s, from blank batches sent by ``coord`` (a
    :class:`~fluid_mpi.runtime.coordinator.FluidCoordinator` whose receives are posted); None when a
    worker did not answer in time. May raise PeerFailure (the caller recovers)."""
    full, part = coord.job.batch_size, max(1, int(coord.job.batch_size * PART))
    times: dict[tuple[str, int], list[float]] = {("ha", full): [], ("ha", part): [], ("ht", full): []}
    for r in range(ROUNDS + 1):  # round 0 opens the path: not timed
        for (mode, n), seen in times.items():
            s = _round(coord, mode, n)
            if s is None:
                return None
            if r:
                seen.append(s)
    med = {k: statistics.median(v) for k, v in times.items()}
    ha = Capacity.from_timings(full, med[("ha", full)], part, med[("ha", part)])
    return ha, len(coord.t.members) * full / med[("ht", full)]


def first_capacities(coord) -> Capacity:
    """Set ``coord.policy``'s first capacities from :func:`probe` (from the warm-up rates, one sub-network
    in-process, when a worker did not answer the probe in time or failed during it); logs them as a
    ``capacity`` event and returns HA's :class:`Capacity`, which the coordinator then corrects."""
    try:
        got = probe(coord)
    except PeerFailure:
        coord.on_failure()
        got = None
    probed = got is not None
    if got is None:
        ha_one, ht_one = coord.rates  # images/s of one sub-network's features and logits, in-process
        got = Capacity.from_rate(coord.job.batch_size, ha_one), ht_one * len(coord.t.members)
    ha, ht = got
    # In HT each rank classifies batches of its own with about the work per image it does on every batch in
    # HA (its sub-network; the head is small), so HT serves at least K x HA. A probe below that was slowed
    # by the shared machine(bench, load 8: HT 3,272/s probed vs HA 4,079/s), and would pin auto
    # to HA through the policy's "HT is not faster" rule, meant for one device left.
    ht = max(ht, len(coord.t.members) * ha.value)
    coord.policy.reset(ha.value, ht, membership=False)
    coord.events.emit("capacity", ha_per_s=round(ha.value, 1), ht_per_s=round(ht, 1),
                      ha_overhead_ms=round(ha.overhead_s * 1000, 3), ha_per_image_us=round(ha.per_image_s * 1e6, 2),
                      probed=probed)
    return ha
