"""HA with a deadline (``--ha-deadline-ms D``): answer each batch with the groups whose features arrived in
time, so a slow or stalling device no longer sets the pace of the whole cluster. Fluid can: it has a
trained head for every subset of groups. Plain Python with the time passed in; the coordinator calls it.

- A batch is answered as soon as every group it was sent to has answered, or once the coordinator's own
  features are ready and D ms have passed since the batch was handed out: then with the head of the groups
  that arrived (the coordinator's own always among them). Features that come later are dropped (counted),
  never used for another batch.
- A device that misses the deadline is not failed: it keeps receiving batches, as many at a time as HA keeps
  in flight (``ha_depth``) plus :data:`CATCH_UP`, so it never queues more than it can catch up on. One that
  misses it persistently is **skipped**: it gets no HA batches for a while, so it stops piling up work it
  will not finish in time, then gets a trial. The rule (:data:`WINDOW_S` and the constants below): among the
  batches sent to it whose fate is known in the last second, at least :data:`MIN_JUDGED` and more than
  :data:`LATE_SHARE` late -> skipped for :data:`SKIP_S`; after that it receives batches again and is judged
  afresh, so a device that keeps up again stays in. Liveness is unchanged: a device that holds a batch past
  ``--rank-timeout`` is treated as lost, late answers or not (the coordinator tracks what each one holds).
"""
from __future__ import annotations

from collections import deque
from typing import Callable

# A device is judged on the last second of its batches: long enough to hold several batches at any
# batch size (HA answers a batch of 64 in ~5 ms here, of 1 in ~1 ms), short enough that a stall is
# acted on within about a second.
WINDOW_S = 1.0
# At least this many judged batches before a skip: one or two late batches are noise (a context switch).
MIN_JUDGED = 4
# Late on more than half of them: the device is slower than the deadline, not unlucky.
LATE_SHARE = 0.5
# Skipped this long, then a trial: one window, so a device that keeps up again is back within ~2 s.
SKIP_S = 1.0
# A device may hold one HA batch more than HA keeps in flight. After a hiccup (a context switch, a page
# fault) its features for the batch in hand and the next come late; holding at most ``ha_depth``, it was
# still holding both when the coordinator answered them at the deadline and moved on, so it got none of
# the next batches either and each hiccup cost a run of partial answers. With one batch of slack it
# catches up: on equal K = 2 devices (virtual cluster, batch 16, deadline 7.9 ms = 1.2 x HA's p99; 4
# interleaved pairs of 2,500 batches) the batches answered without every group fell from 1.77 % to
# 0.60 %; with one host at a quarter of the CPU, p99 stayed at 8.5 ms and images/s rose 10 %.
CATCH_UP = 1


class HADeadline:
    """The deadline's decisions for one run: which workers get each HA batch, when a batch is due, who was
    late, who is skipped. Every decision takes the time (``now``, the coordinator's clock) as an argument.
    ``emit(event, **fields)`` writes ``ha_skip`` / ``ha_unskip`` events."""

    def __init__(self, deadline_s: float, emit: Callable[..., None] = lambda *a, **k: None):
        self.deadline_s, self.emit = deadline_s, emit
        self.judged: dict[int, deque[tuple[float, bool]]] = {}  # worker -> (when, on time) in the window
        self.skipped_until: dict[int, float] = {}
        self.targets: dict[int, list[int]] = {}  # batch -> the workers it was sent to
        self.pending: dict[int, dict[int, float]] = {}  # worker -> {batch: when sent}, until its features come
        self.late_dropped = 0  # features that came after their batch was answered
        self.by_subset: dict[str, int] = {}  # answers per subset of groups ("0+2"), every answer counted

    def send_to(self, batch: int, workers: list[int], now: float, depth: int | None = None) -> list[int]:
        """The workers that get ``batch``: those not skipped now and holding fewer than ``depth`` (the HA
        batches in flight) + :data:`CATCH_UP` HA batches (a late device must not pile up a queue it can
        never catch up on: answered at the deadline, batches leave the coordinator faster than it computes
        them). Remembers them and when it went out."""
        for w in [w for w, until in self.skipped_until.items() if now >= until]:
            del self.skipped_until[w]
            self.judged.pop(w, None)  # judged afresh on the trial's batches
            self.emit("ha_unskip", rank=w)
        chosen = [w for w in workers if w not in self.skipped_until
                  and (depth is None or len(self.pending.get(w, ())) < depth + CATCH_UP)]
        self.targets[batch] = chosen
        for w in chosen:
            self.pending.setdefault(w, {})[batch] = now
        return chosen

    def arrived(self, worker: int, batch: int) -> bool:
        """Features of ``batch`` from ``worker`` came in; False when they are late (the batch is answered)."""
        self.pending.get(worker, {}).pop(batch, None)
        if batch in self.targets:
            return True
        self.late_dropped += 1
        return False

    def ready(self, batch: int, have: set[int], me: int, sent_at: float, now: float) -> bool:
        """Whether ``batch`` can be answered now with the groups in ``have``."""
        if me not in have:
            return False
        return set(self.targets.get(batch, ())) <= have or now - sent_at >= self.deadline_s

    def answered(self, batch: int, have: set[int], now: float) -> None:
        """``batch`` was answered with ``have``: each worker it was sent to was on time or late; a worker late
        on most of its recent batches is skipped."""
        key = "+".join(map(str, sorted(have)))
        self.by_subset[key] = self.by_subset.get(key, 0) + 1
        for w in self.targets.pop(batch, ()):
            seen = self.judged.setdefault(w, deque())
            seen.append((now, w in have))
            while seen and now - seen[0][0] > WINDOW_S:
                seen.popleft()
            late = sum(1 for _, ok in seen if not ok)
            if w not in self.skipped_until and len(seen) >= MIN_JUDGED and late > LATE_SHARE * len(seen):
                self.skipped_until[w] = now + SKIP_S
                self.emit("ha_skip", rank=w, late=late, judged=len(seen), for_s=SKIP_S)

    def holding(self) -> bool:
        """Some worker still holds a batch sent to it (answered or not)."""
        return any(self.pending.values())

    def forget(self) -> None:
        """After a membership change every batch in flight is re-sent: what was pending is void."""
        self.targets.clear()
        self.pending.clear()

    def summary(self) -> dict:
        return {"deadline_ms": round(self.deadline_s * 1000, 3), "late_features_dropped": self.late_dropped,
                "answers_by_subset": dict(sorted(self.by_subset.items())),
                "skipped_now": sorted(self.skipped_until)}
