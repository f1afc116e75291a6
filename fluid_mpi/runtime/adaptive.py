"""The ``--mode auto`` policy: High-Accuracy while the cluster keeps up, High-Throughput when it does not
(plain Python, no torch, no MPI; every time comes from the caller, so tests drive it with a fake clock).

The caller (the coordinator) measures HA's capacity (:mod:`fluid_mpi.runtime.capacity`), tells
:class:`ModePolicy` how many inputs arrived and when, and asks it before each batch which mode to use.
The rule is in :class:`ModePolicy`'s docstring and in docs/adaptive.md.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

HA, HT = "ha", "ht"

# Switch up to HT once arrivals exceed 90 % of HA's capacity: a queue served at utilisation rho waits
# ~rho/(1-rho) service times, so above ~0.9 HA's latency explodes under Poisson arrivals.
UP_FRACTION = 0.9
# With a latency target the rate rule is kept for clear overloads, arrivals 25 % over HA's capacity (the
# larger of the estimate and what HA answered over the window): below that the target's own rule (the backlog
# HA would answer in time) decides, and HA keeps its accuracy wherever it meets the user's target. The 25 %
# is the estimate's error measured here: at 23,000/s arriving, the live estimate read 18.8-23.0k/s (the
# machine's slow phases, 5-10 batches at 1.5-2x) where HA alone served 23.1-24.6k/s saturated with a p99 of
# 77 ms against the 100 ms target; at 0.9, 1.0 and 1.1 the rate rule sent auto to HT in most runs at that
# load, which HA sustained (2026-11-30, this machine).
UP_FRACTION_WITH_TARGET = 1.25
# Come back to HA only below 70 % of HA's capacity: the 20-point gap is the hysteresis band, wider than a
# one-second window's Poisson noise at a few hundred images/s (1/sqrt(n) ~ 5 %), so the mode does not flap.
DOWN_FRACTION = 0.7
# Plan for the backlog to drain within 60 % of the latency target: the rest is left for batching, the
# transport and the capacity estimate's error, none of which the drain estimate sees. At 80 %, a load just
# over HA's capacity (22k/s arriving, HA serving 21.6k) left auto's p99 at 105 ms against HT's 67 ms and
# the 100 ms target (2026-11-30 12:28 sweep): the estimate there ran up to 18 % above what HA served, and
# 0.8 / 1.18 = 0.68 of the target is what the drain really took; 0.6 leaves room below that.
LATENCY_MARGIN = 0.6
# "Nearly empty" backlog, to hand back to HA: what HA clears in 2 % of a window (20 ms by default: two or
# three full batches at the ~8k images/s HA does on 2 cores). At 0.1, a quick bench's step load (machine
# load ~7) handed back to HA with 241 inputs (72 ms of HA work) waiting, and went straight up to HT again.
NEARLY_EMPTY = 0.02
# The rate rule counts (in HA) only once the backlog holds some HA work: a queue that stays below shows HA
# keeping up whatever the estimate of its capacity says (a noisy early rate, or an estimate read low at a
# light load). Without a target that is NEARLY_EMPTY (20 ms), as the rate rule fires at 0.9 x, within the
# Poisson noise of an early rate. With a target the rate rule fires only at 1.25 x, a clear overload, and 1 %
# of a window (10 ms, ~210 inputs at the ~21k/s HA does on 2 cores: three full batches) is enough. At 20 ms
# a stream starting at 70 % of HT's capacity stayed 30 ms in HA (9 batches, 485 waiting) and HT, with 43 %
# to spare, took another ~40 ms to work that off: 2-3 % of a 3 s run's inputs waited 30-60 ms longer, which
# is a p99 (auto 101 ms against HT's 87, 14:11 sweep). What HA served over the window (a floor of its
# capacity) keeps the rule from firing on a load HA carries.
RATE_PROOF = 0.01
# Until one full window has passed, divide arrivals by at least 2 % of a window (20 ms), so that a first
# burst is not divided by a near-zero span (an infinite rate). 20 ms holds ~90 arrivals at a 10 % load on a
# quiet 2-core machine (+-10 % Poisson noise), and a noisy early rate switches nothing by itself: the rate
# counts only once the backlog holds 20 ms of HA work (10 ms with a target: RATE_PROOF). At a tenth of a
# window (the value before), a run starting at 90 % of HT's capacity stayed ~50 ms in HA and left ~1,000 inputs waiting,
# which HT, with ~10 % to spare, took the whole 3 s run to work off (p99 133 ms against HT's 71 ms).
MIN_SPAN_FRACTION = 0.02
# After a switch for a backlog, back to HA once it is drained if the arrivals are at most 5 % over HA's
# capacity: a one-second count's Poisson noise at a few thousand images/s (1/sqrt(n) ~ 1-2 %) with room to
# spare, and no more, so that HA does not resume a load it cannot carry.
PEAK_FRACTION = 1.05


@dataclass
class Decision:
    """What :meth:`ModePolicy.decide` chose and why; :meth:`event` is the ``mode_switch`` event."""

    mode: str
    was: str
    backlog: int
    arrival_rate: float  # images/s over the recent window
    reason: str

    @property
    def changed(self) -> bool:
        return self.mode != self.was

    def event(self) -> dict:
        """``{mode, was, backlog, arrival_rate, reason}`` for the ``--events`` log (log it when changed)."""
        return {"mode": self.mode, "was": self.was, "backlog": self.backlog,
                "arrival_rate": round(self.arrival_rate, 3), "reason": self.reason}


class WindowCount:
    """A count over the last ``window_s`` seconds (arrivals, answers), its sum kept up to date: at tens of
    thousands of images/s the window holds thousands of polls, summing 2,000 of them takes ~50 us (timed
    here), and the coordinator decides on every pass of its loop."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self._events: deque[tuple[float, int]] = deque()
        self._sum = 0

    def clear(self) -> None:
        self._events.clear()
        self._sum = 0

    def add(self, now: float, count: int) -> None:
        if count > 0:
            self._events.append((now, count))
            self._sum += count

    def count(self, now: float) -> int:
        """What was added in ``(now - window_s, now]``."""
        while self._events and self._events[0][0] <= now - self.window_s:
            self._sum -= self._events.popleft()[1]
        return self._sum


class ModePolicy:
    """Chooses HA or HT per batch from the recent arrival rate and the backlog.

    With ``r`` the arrival rate over the last ``window_s`` seconds, ``B`` the backlog (arrived, not yet
    dispatched), ``C_ha`` HA's capacity (images/s at full batches) and ``T`` the latency target
    (``latency_ms``/1000, or none):

    - HA *can keep up* when ``r < up × C`` (``C``: the larger of ``C_ha`` and what HA answered over the window;
      ``up`` = 0.9, or 1.25 with a target, whose rule guards the rest) or the backlog is short
      (``B <= 0.02 × C_ha × window_s``, 0.01 with a target: the queue itself shows HA keeping up, whatever
      the estimate of ``C_ha`` says; not right after a membership change), and HA answers the backlog in time:
      ``B / C_ha <= 0.6 × T`` with a target (the newest waiting input would be answered within the target),
      ``B <= C_ha × window_s`` (what HA clears in about one window) without one. The oldest input's wait
      is not counted: a stall that has passed (start-up, a context switch) cannot be undone by HT, and a
      backlog that HA clears in time needs no HT either.
    - From HA, switch to **HT** as soon as HA cannot keep up (the reason names the failed condition).
    - From HT, go back to **HA** when the backlog is nearly empty (``B <= 0.02 × C_ha × window_s``), the
      target (if any) would be met, and: after a switch made for the arrival rate, the load has fallen
      (``r < down × C_ha``, ``down`` = 0.7) and HT has been on for at least ``window_s`` (hysteresis: no
      flapping around the rate threshold); after a switch made for a backlog (a burst, a target at risk),
      arrivals are at most 5 % over HA's capacity (``r < 1.05 × C``), with no dwell: HT only drains the
      backlog, a peak of a load HA carries on average.
    - When HT is not faster than HA (``C_ht <= C_ha``, e.g. one device left), HA: HT would only cost accuracy.
    - :meth:`reset` (a membership change) forgets the current mode's history and re-decides with the
      new capacities from the HA rule alone, as if starting afresh with the arrivals seen so far.
    """

    def __init__(self, latency_ms: float | None, ha_capacity: float, ht_capacity: float,
                 window_s: float = 1.0, hysteresis: tuple[float, float] | None = None,
                 start: float = 0.0, mode: str = HA):
        """``hysteresis``: (up, down) fractions of HA's capacity; by default (0.9, 0.7), or (1.25, 0.7) with
        a latency target."""
        up, down = hysteresis or (UP_FRACTION if latency_ms is None else UP_FRACTION_WITH_TARGET, DOWN_FRACTION)
        if not 0 < down < up:
            raise ValueError(f"hysteresis must be (up, down) with 0 < down < up, not {hysteresis}")
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, not {window_s}")
        if mode not in (HA, HT):
            raise ValueError(f"mode must be 'ha' or 'ht', not {mode!r}")
        self.target_s = None if latency_ms is None else latency_ms / 1000.0
        self.window_s, self.up, self.down = window_s, up, down
        # the queue the rate rule needs as proof, in windows of HA work: less for the target's clear overload
        self.proof = NEARLY_EMPTY if self.target_s is None else RATE_PROOF
        self.start = start
        self._arrivals, self._served = WindowCount(window_s), WindowCount(window_s)
        self.mode, self.since = mode, start
        self.dwell_s = window_s  # how long HT stays on at least (0 after a switch for a backlog)
        self._served_then = 0.0  # HA's capacity floor (what it served) at the last decision made in HA
        self._fresh = False
        self.reset(ha_capacity, ht_capacity, membership=False)

    def begin(self, now: float) -> None:
        """The inputs start arriving now: the rate's span counts from here (not from the policy's creation,
        which the warm-up and the start-up probe precede), and nothing seen before counts."""
        self.start, self.since = now, now
        self._arrivals.clear()
        self._served.clear()

    def observe_arrivals(self, now: float, count: int) -> None:
        """``count`` inputs arrived at ``now`` (call it with what each poll of the source returned)."""
        self._arrivals.add(now, count)

    def observe_served(self, now: float, count: int) -> None:
        """``count`` inputs were answered in HA at ``now`` (what HA served is a floor of its capacity)."""
        self._served.add(now, count)

    def set_capacity(self, ha_capacity: float | None = None, ht_capacity: float | None = None) -> None:
        """Update the capacity estimates (e.g. after each batch's ``Capacity`` update)."""
        if ha_capacity is not None and ha_capacity > 0:
            self.ha_capacity = float(ha_capacity)
        if ht_capacity is not None and ht_capacity > 0:
            self.ht_capacity = float(ht_capacity)

    def reset(self, ha_capacity: float, ht_capacity: float, membership: bool = True) -> None:
        """New capacities; with ``membership`` (the surviving devices after a loss) the next :meth:`decide`
        re-decides from scratch (no hysteresis carried over from the old membership) and says so."""
        if ha_capacity <= 0 or ht_capacity <= 0:
            raise ValueError(f"capacities must be > 0, not ha={ha_capacity} ht={ht_capacity}")
        self.ha_capacity, self.ht_capacity = float(ha_capacity), float(ht_capacity)
        self._fresh = membership

    def _span(self, now: float) -> float:
        return min(self.window_s, max(now - self.start, MIN_SPAN_FRACTION * self.window_s))

    def arrival_rate(self, now: float) -> float:
        """Inputs per second over the last ``window_s`` seconds."""
        return self._arrivals.count(now) / self._span(now)

    def served_rate(self, now: float) -> float:
        """Inputs per second answered in HA over the last ``window_s`` seconds."""
        return self._served.count(now) / self._span(now)

    def _ha_shortfall(self, c: float, rate: float, backlog: int, load_fraction: float,
                      backlog_limit: float | None, proof: float | None = None,
                      rate_c: float | None = None) -> str | None:
        """Why HA would not keep up at ``load_fraction`` of its capacity ``c``, or None when it would (a reason
        that starts with "arrivals" is the rate's). With ``proof``, the rate counts only with a backlog
        above it: a queue that stays nearly empty shows HA keeping up, whatever the estimate of its
        capacity says (at light loads HA cuts small batches, and the model's extrapolation to full ones
        read 14k/s where HA served 24k/s). ``rate_c``: the capacity the rate is compared with, if not ``c``."""
        rc = c if rate_c is None else rate_c
        if rate >= load_fraction * rc and (proof is None or backlog > proof):
            return f"arrivals {rate:.1f}/s >= {load_fraction:g} x HA capacity {rc:.1f}/s, backlog {backlog}"
        if self.target_s is not None:
            projected = backlog / c
            if projected > LATENCY_MARGIN * self.target_s:
                return (f"backlog {backlog} would be answered in {projected * 1000:.0f} ms in HA, over "
                        f"{LATENCY_MARGIN:g} x the {self.target_s * 1000:g} ms target")
        if backlog_limit is not None and backlog > backlog_limit:
            return f"backlog {backlog} > {backlog_limit:.0f} (what HA clears in {backlog_limit / c:.2g} s)"
        return None

    def decide(self, now: float, backlog: int, oldest_wait_s: float = 0.0) -> Decision:
        """The mode for the next batch. ``backlog``: inputs arrived and not yet dispatched;
        ``oldest_wait_s``: how long the oldest of them has waited (0 when none; named in the reason, not part
        of the rule). Log ``decision.event()`` as a ``mode_switch`` event when ``decision.changed``."""
        was, rate = self.mode, self.arrival_rate(now)
        fresh, self._fresh = self._fresh, False
        c = self.ha_capacity
        if self.ht_capacity <= c:
            mode, reason = HA, f"HT capacity {self.ht_capacity:.1f}/s is not above HA's {c:.1f}/s"
        elif was == HA or fresh:
            # What HA answered over the window is a floor of its capacity: a slow phase of the machine (five
            # batches at 1.7x) pulled the estimate to 20.6k/s while HA answered the 23k/s arriving. Not
            # after a membership change: those answers came from the devices before it.
            self._served_then = 0.0 if fresh else self.served_rate(now)
            c = max(c, self._served_then)
            limit = None if self.target_s is not None else c * self.window_s  # the target rules if set
            # after a membership change the capacity drop is known: the rate decides at once
            proof = None if fresh else self.proof * c * self.window_s
            short = self._ha_shortfall(c, rate, backlog, self.up, limit, proof)
            mode = HT if short else HA
            if short:
                self.dwell_s = self.window_s if short.startswith("arrivals") else 0.0
            reason = short or (f"HA keeps up: arrivals {rate:.1f}/s < {self.up:g} x {c:.1f}/s, "
                               f"backlog {backlog}")
        else:  # in HT: back to HA only when the load has clearly fallen and HT has had its window; after a
            # switch for a backlog, as soon as it is drained if the arrivals are within 5 % of HA's capacity
            # (HA carries the load on average: HT only shaved a peak). At 1.25 x instead, auto went back to
            # HA at 25.6k/s arriving where HA served 22.5k, again and again, and its p99 reached 104 ms
            # against HT's 67 (12:35 sweep).
            burst = self.dwell_s == 0
            c_back = max(c, self._served_then)
            short = self._ha_shortfall(c, rate, backlog, PEAK_FRACTION if burst else self.down,
                                       NEARLY_EMPTY * c * self.window_s, rate_c=c_back if burst else None)
            if short is None and now - self.since < self.dwell_s:
                short = f"in HT for {now - self.since:.2f} s < {self.dwell_s:g} s"
            mode = HT if short else HA
            reason = (f"still HT: {short}" if short else
                      f"backlog drained: arrivals {rate:.1f}/s < {PEAK_FRACTION:g} x {c_back:.1f}/s, "
                      f"backlog {backlog}"
                      if burst else
                      f"load fell: arrivals {rate:.1f}/s < {self.down:g} x {c:.1f}/s, backlog {backlog}")
        if oldest_wait_s > 0:
            reason = f"{reason}, oldest waited {oldest_wait_s * 1000:.0f} ms"
        if fresh:
            reason = f"membership change: {reason}"
        if mode != was:
            self.mode, self.since = mode, now
        return Decision(mode, was, int(backlog), rate, reason)
