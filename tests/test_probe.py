"""The start-up probe's use (fluid_mpi.runtime.probe.first_capacities) with a stand-in coordinator."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from fluid_mpi.runtime import probe
from fluid_mpi.runtime.adaptive import ModePolicy
from fluid_mpi.runtime.capacity import Capacity


def coordinator(k: int = 2):
    events = []
    return SimpleNamespace(policy=ModePolicy(100.0, 1.0, 2.0), t=SimpleNamespace(members=list(range(k))),
                           job=SimpleNamespace(batch_size=64), rates=(20_000.0, 19_000.0),
                           events=SimpleNamespace(emit=lambda kind, **kw: events.append((kind, kw))), seen=events)


def test_a_probe_slowed_below_k_times_ha_cannot_pin_auto_to_ha(monkeypatch):
    ha = Capacity.from_timings(64, full_s=64 / 4079, part_n=16, part_s=16 / 4079)
    monkeypatch.setattr(probe, "probe", lambda coord: (ha, 3272.0))  # HT probed below HA (load 8)
    c = coordinator(2)
    assert probe.first_capacities(c) is ha
    assert c.policy.ha_capacity == pytest.approx(4079.0) and c.policy.ht_capacity == pytest.approx(2 * 4079.0)
    assert c.policy.decide(0.0, 0).mode == "ha" and "not above" not in c.policy.decide(0.0, 0).reason
    kind, ev = c.seen[0]
    assert kind == "capacity" and ev["probed"] and ev["ht_per_s"] == pytest.approx(8158.0)


def test_without_a_probe_the_warm_up_rates_are_used(monkeypatch):
    monkeypatch.setattr(probe, "probe", lambda coord: None)  # a worker did not answer in time
    c = coordinator(3)
    ha = probe.first_capacities(c)
    assert ha.value == pytest.approx(20_000.0) and c.policy.ht_capacity == pytest.approx(60_000.0)
    assert c.seen[0][1]["probed"] is False
