"""The --mode auto policy (fluid_mpi.runtime.adaptive) driven by a fake clock and fake arrivals."""
from __future__ import annotations

import numpy as np
import pytest

from fluid_mpi.runtime.adaptive import HA, HT, Capacity, Decision, ModePolicy

DT = 0.01  # simulation step: 10 ms, about one batch at these capacities
C_HA, C_HT = 1000.0, 2000.0  # images/s: HT twice HA, as with 2 devices


def simulate(policy: ModePolicy, load, seconds: float, t0: float = 0.0, backlog: float = 0.0,
             seed: int = 0, caps=None):
    """Run the policy for ``seconds``: Poisson arrivals at ``load(t)`` images/s, served at the chosen
    mode's capacity. Returns (modes per step, switch decisions, final backlog, end time)."""
    rng = np.random.default_rng(seed)
    caps = caps or {HA: C_HA, HT: C_HT}
    modes, switches = [], []
    t = t0
    for _ in range(int(round(seconds / DT))):
        t = round(t + DT, 9)
        n = int(rng.poisson(load(t) * DT))
        policy.observe_arrivals(t, n)
        backlog += n
        d = policy.decide(t, int(backlog), oldest_wait_s=0.0 if backlog < 1 else DT)
        if d.changed:
            switches.append((t, d))
        modes.append(d.mode)
        backlog = max(0.0, backlog - caps[d.mode] * DT)
    return modes, switches, backlog, t


def test_low_load_stays_ha():
    policy = ModePolicy(None, C_HA, C_HT)
    modes, switches, backlog, _ = simulate(policy, lambda t: 0.5 * C_HA, 10.0)
    assert set(modes) == {HA} and not switches and backlog < 20


def test_rising_load_switches_to_ht_then_falling_load_returns_to_ha_once():
    policy = ModePolicy(None, C_HA, C_HT)

    def step(t):  # low -> high (1.5x HA, within HT's capacity) -> low
        return 1.5 * C_HA if 5.0 <= t < 10.0 else 0.3 * C_HA

    modes, switches, backlog, _ = simulate(policy, step, 15.0)
    assert [d.mode for _, d in switches] == [HT, HA]
    (t_up, up), (t_down, down) = switches
    assert 5.0 < t_up < 5.8  # caught within the rate window
    assert 10.0 < t_down < 12.5  # after the load fell and HT had its window
    assert up.was == HA and "arrivals" in up.reason and up.arrival_rate > 0.9 * C_HA
    assert down.was == HT and "load fell" in down.reason
    ev = up.event()
    assert set(ev) == {"mode", "was", "backlog", "arrival_rate", "reason"} and ev["mode"] == HT
    assert backlog < 50  # nothing piled up: HT drained the high phase


def test_no_flapping_around_the_threshold():
    policy = ModePolicy(None, C_HA, C_HT)

    def wobble(t):  # alternates every 2 s just below and just above the 0.9 switch-up point
        return (0.85 if int(t // 2) % 2 == 0 else 0.95) * C_HA

    modes, switches, _, _ = simulate(policy, wobble, 20.0, seed=1)
    assert len(switches) <= 1  # up once, then it stays: 0.85 is above the 0.7 way back
    # inside the hysteresis band the current mode is kept either way
    for start in (HA, HT):
        p = ModePolicy(None, C_HA, C_HT, mode=start)
        modes, switches, _, _ = simulate(p, lambda t: 0.8 * C_HA, 10.0, seed=2)
        assert set(modes) == {start} and not switches


def test_ht_dwells_one_window_before_returning():
    policy = ModePolicy(None, C_HA, C_HT)
    policy.observe_arrivals(0.1, 5000)  # a burst: backlog far beyond one window of HA
    assert policy.decide(0.1, 5000).mode == HT
    policy2 = ModePolicy(None, C_HA, C_HT, window_s=1.0)
    policy2.mode, policy2.since = HT, 0.0
    assert policy2.decide(0.5, 0).mode == HT  # load gone, but HT has been on for 0.5 s < window
    d = policy2.decide(1.0, 0)
    assert d.mode == HA and d.changed


def test_latency_target_forces_ht_when_ha_would_miss_it():
    burst = 500  # drains in 0.5 s in HA, 0.25 s in HT
    no_target = ModePolicy(None, C_HA, C_HT)
    no_target.observe_arrivals(2.0, burst)
    assert no_target.decide(2.0, burst).mode == HA  # within one window of HA: keep the accuracy
    target = ModePolicy(300.0, C_HA, C_HT)
    target.observe_arrivals(2.0, burst)
    d = target.decide(2.0, burst, oldest_wait_s=0.0)
    assert d.mode == HT and "target" in d.reason  # 500 ms > 0.8 x 300 ms
    relaxed = ModePolicy(1000.0, C_HA, C_HT)
    relaxed.observe_arrivals(2.0, burst)
    assert relaxed.decide(2.0, burst).mode == HA  # 500 ms <= 0.8 x 1000 ms
    # the oldest input's wait counts too
    waited = ModePolicy(100.0, C_HA, C_HT)
    assert waited.decide(2.0, 10, oldest_wait_s=0.09).mode == HT


def test_latency_target_holds_in_simulation_when_ht_can_meet_it():
    policy = ModePolicy(50.0, C_HA, C_HT)
    modes, switches, backlog, _ = simulate(policy, lambda t: 0.95 * C_HA, 5.0)
    assert modes.count(HT) > 0.8 * len(modes) and backlog < 0.05 * C_HT


def test_reset_after_membership_change_re_decides():
    policy = ModePolicy(None, C_HA, C_HT)
    simulate(policy, lambda t: 0.5 * C_HA, 3.0)
    assert policy.mode == HA
    policy.reset(400.0, 700.0)  # a device lost: HA now serves 400/s, below the 500/s arriving
    d = policy.decide(3.01, 5)
    assert d.mode == HT and d.changed and d.reason.startswith("membership change")
    # one device left: HT is no faster than HA, so HA (HT would only cost accuracy)
    policy.reset(600.0, 600.0)
    d = policy.decide(3.02, 5)
    assert d.mode == HA and d.reason.startswith("membership change") and "not above" in d.reason
    # from HT at a low load, a reset re-decides at once (no dwell carried over)
    p = ModePolicy(None, C_HA, C_HT, mode=HT)
    p.observe_arrivals(0.5, 10)
    p.since = 0.4
    p.reset(900.0, 1500.0)
    assert p.decide(0.5, 0).mode == HA


def test_capacity_ewma_and_validation():
    cap = Capacity()
    assert cap.value is None and cap.update(64, 0.0) is None  # zero time: ignored
    assert cap.update(64, 0.064) == pytest.approx(1000.0)
    assert cap.update(64, 0.032) == pytest.approx(0.3 * 2000 + 0.7 * 1000)
    assert Capacity(500.0).update(0, 1.0) == 500.0
    policy = ModePolicy(None, C_HA, C_HT)
    policy.set_capacity(ha_capacity=cap.value, ht_capacity=None)
    assert policy.ha_capacity == pytest.approx(1300.0) and policy.ht_capacity == C_HT
    with pytest.raises(ValueError):
        ModePolicy(None, C_HA, C_HT, hysteresis=(0.7, 0.9))
    with pytest.raises(ValueError):
        ModePolicy(None, 0.0, C_HT)
    assert isinstance(policy.decide(0.0, 0), Decision)
