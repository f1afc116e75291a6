"""Small rules of the coordinators, in plain Python: each rank's expected share of the batches, which
head (Fluid) survives a failure. No MPI, no torch."""
from __future__ import annotations


def expected_share(n_batches: int, ranks: int, mode: str) -> int:
    """Batches one rank is expected to compute: all of them in HA and sliced runs, its share in HT (and
    auto, whose share depends on the load)."""
    return -(-n_batches // ranks) if mode in ("ht", "auto") else n_batches


def fluid_subset(alive_world_ranks: list[int]) -> tuple[int, ...]:
    """Groups a Fluid HA head combines: group j lives on world rank j."""
    return tuple(sorted(alive_world_ranks))


# HA batches in flight: the next one is already at the workers while this one's features come back (a
# third gave no gain: the workers compute one batch at a time).
HA_DEPTH = 2


def ha_depth(batch_size: int) -> int:
    """HA batches in flight: :data:`HA_DEPTH`, but one at batch 1. In a saturated run each input waits for
    the batches in flight before it (latency = in flight / throughput), and batch 1 is what a user who
    wants each answer fast runs: on a quiet 2-core machine(4 interleaved pairs, 4,000 images)
    one in flight gave a p50 of 0.59 ms against 1.07 ms for two (-44 %), at 1,474 against 1,611 images/s
    (-9 %). At batch 64 two in flight keep the workers busy while the features come back."""
    return 1 if batch_size == 1 else HA_DEPTH


# Batches an HT worker may hold (one computing, the rest queued) at batch 64 and above: two keep it busy
# while the coordinator computes a batch of its own (~2 ms at batch 64); 4 and 8 gave the same images/s
# (5 interleaved runs each), and every extra batch is work a slow device keeps to the end.
HT_CREDIT = 2
# Below batch 64 a batch is shorter than the coordinator's own step, and 2 left the worker waiting: 4
# raised HT at batch 16 from 27.5k to 33.5k images/s (medians of 4 interleaved runs) and at batch 1 from
# 4,231 to 4,545 (6 and 4 runs); 8 and 16 gave no more(quiet 2-core machine).
HT_CREDIT_SMALL = 4


def ht_credit(batch_size: int) -> int:
    """Batches an HT worker may hold: :data:`HT_CREDIT_SMALL` below batch 64, else :data:`HT_CREDIT`."""
    return HT_CREDIT_SMALL if batch_size < 64 else HT_CREDIT


def overdue_workers(ht: dict[int, dict[int, float]], ha_oldest: tuple[float, dict] | None, workers: list[int],
                    now: float, rank_timeout: float) -> list[int]:
    """Workers holding work past ``rank_timeout``: in HT, one whose oldest batch (``ht``: worker ->
    {batch: when sent}) is older; in HA, every worker that has not answered the oldest batch in flight
    (``ha_oldest``: when it was sent, {world rank: features} so far) once that batch is older."""
    late = {w for w, sent in ht.items() if sent and now - min(sent.values()) > rank_timeout}
    if ha_oldest is not None and now - ha_oldest[0] > rank_timeout:
        late |= {w for w in workers if w not in ha_oldest[1]}
    return sorted(late)


def ht_hold(credit: int, waiting_batches: int, ranks: int) -> int:
    """Batches an HT worker may hold now: its credit, but no more than its share of what waits (every
    rank counted): at the end of a run, or in a short one, the credit would hand the workers everything
    and leave rank 0 idle."""
    return min(credit, max(1, -(-waiting_batches // ranks)))
