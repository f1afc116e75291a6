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
# With a latency target the rate rule is kept for clear overloads: 25 % over HA's capacity is the live
# estimate's measured error, so below it the target's own rule (the backlog HA would answer in time) decides.
UP_FRACTION_WITH_TARGET = 1.25
# Come back to HA only below 70 % of HA's capacity: a hysteresis band wider than a one-second window's
# Poisson noise at a few hundred images/s (1/sqrt(n) ~ 5 %), so the mode does not flap.
DOWN_FRACTION = 0.7
# Plan for the backlog to drain within 60 % of the latency target: the rest is left for batching, the
# transport and the capacity estimate's error (up to 18 % high near saturation), none of which it sees.
LATENCY_MARGIN = 0.6
# "Nearly empty" backlog, to hand back to HA: what HA clears in 2 % of a window (20 ms by default, two or
# three full batches); less hands back with work waiting and goes straight up to HT again.
NEARLY_EMPTY = 0.02
# With a target, the rate rule counts once the backlog holds 1 % of a window of HA work (10 ms, ~3 full
# batches): the rule fires only at a clear overload, and waiting longer delays HT enough to show in the p99.
# Without a target the proof is NEARLY_EMPTY, since the 0.9 rule sits within an early rate's noise.
RATE_PROOF = 0.01
# Until a full window has passed, divide arrivals by at least 2 % of a window (20 ms), so that a first burst
# is not divided by a near-zero span (an infinite rate); a shorter floor kept a heavy start in HA too long.
MIN_SPAN_FRACTION = 0.02
# After a switch for a backlog, back to HA once drained if arrivals are at most 5 % over HA's capacity: a
# one-second count's Poisson noise at a few thousand images/s (1-2 %) with room to spare, and no more.
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
            # (HA carries the load on average: HT only shaved a peak); a wider margin sent auto back to an
            # HA that could not carry the load, again and again.
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
