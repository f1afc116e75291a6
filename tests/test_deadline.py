"""HA with a deadline: the decisions (runtime/deadline.py) with hand-written times, then the coordinator
against the fake transport with a slow worker (no MPI; time is the fake transport's clock)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fluid_mpi.runtime.coordinator import FluidCoordinator
from fluid_mpi.runtime.deadline import LATE_SHARE, MIN_JUDGED, SKIP_S, WINDOW_S, HADeadline
from fluid_mpi.runtime.events import EventLog
from fluid_mpi.runtime.faults import FaultPlan
from fluid_mpi.runtime.protocol import RunSpec

from fake_transport import FakeTransport
import test_coordinator
from test_coordinator import BATCH, N, CaptureSink

setup = test_coordinator.setup  # the trained model and its parts (a module fixture), shared


def test_a_batch_is_due_when_all_came_or_at_the_deadline_with_mine():
    d = HADeadline(0.050)
    assert d.send_to(7, [1, 2], now=10.0) == [1, 2]
    assert not d.ready(7, {1, 2}, me=0, sent_at=10.0, now=10.001)  # not without the coordinator's own
    assert d.ready(7, {0, 1, 2}, me=0, sent_at=10.0, now=10.001)  # all in: at once
    assert not d.ready(7, {0, 1}, me=0, sent_at=10.0, now=10.049)
    assert d.ready(7, {0, 1}, me=0, sent_at=10.0, now=10.050)  # the deadline: with what came
    assert d.arrived(1, 7) and d.pending[1] == {}
    d.answered(7, {0, 1}, now=10.05)
    assert not d.arrived(2, 7) and d.late_dropped == 1 and d.pending[2] == {}  # late: dropped, counted
    assert d.summary()["answers_by_subset"] == {"0+1": 1}


def test_a_device_late_on_most_batches_is_skipped_then_tried_again():
    events = []
    d = HADeadline(0.050, lambda e, **f: events.append((e, f)))
    t = 0.0
    for b in range(MIN_JUDGED):  # worker 2 late every time, worker 1 on time
        t += 0.1
        assert d.send_to(b, [1, 2], t) == [1, 2]
        d.answered(b, {0, 1}, t + 0.05)
    assert events == [("ha_skip", {"rank": 2, "late": MIN_JUDGED, "judged": MIN_JUDGED, "for_s": SKIP_S})]
    t += 0.1
    assert d.send_to(99, [1, 2], t) == [1]  # skipped: no HA work
    assert d.send_to(100, [1, 2], t + SKIP_S) == [1, 2] and events[-1] == ("ha_unskip", {"rank": 2})
    for b in range(101, 101 + MIN_JUDGED):  # on time again: stays in
        t += 0.1
        d.send_to(b, [1, 2], t + SKIP_S)
        d.answered(b, {0, 1, 2}, t + SKIP_S)
    assert [e for e, _ in events].count("ha_skip") == 1 and d.summary()["skipped_now"] == []


def test_occasional_lateness_and_old_lateness_do_not_skip():
    events = []
    d = HADeadline(0.050, lambda e, **f: events.append(e))
    for b in range(20):  # late on every third batch: a third < LATE_SHARE
        d.send_to(b, [1], b * 0.01)
        d.answered(b, {0} if b % 3 == 0 else {0, 1}, b * 0.01)
    assert 1 / 3 < LATE_SHARE and events == []
    for b in range(20, 23):  # three late in a row, after a second on time: under MIN_JUDGED in the window
        d.send_to(b, [1], 5.0 + WINDOW_S * b)
        d.answered(b, {0}, 5.0 + WINDOW_S * b)
    assert events == []


def _run(setup, monkeypatch, tmp_path, delay, deadline_ms):
    _, parts, ds = setup
    t = FakeTransport(3, parts={1: parts[1], 2: parts[2]}, delay=delay)
    job = RunSpec("fluid", "ha", images=ds.images, labels=ds.labels, indices=np.arange(N), batch_size=BATCH,
                  rank_timeout=60.0, faults=FaultPlan(), stamp_dir=str(tmp_path), ha_deadline_ms=deadline_ms)
    sink, events = CaptureSink(), EventLog(None)
    coord = FluidCoordinator(t, parts[0], job, sink, t.liveness(monkeypatch), events, clock=t.clock, credit=2)
    return coord, sink, events, coord.run()


def test_slow_worker_answers_go_on_without_it_each_with_its_subsets_head(setup, monkeypatch, tmp_path):
    model, _, ds = setup
    slow = 30  # polls of 10 ms: worker 2 answers 300 ms after each batch, the deadline is 50 ms
    coord, sink, events, outcome = _run(setup, monkeypatch, tmp_path, lambda w, b: slow if w == 2 else 1, 50)
    assert outcome.status == "ok" and sorted(sink.logits) == list(range(N)) and sink.duplicates == 0
    x = torch.from_numpy(np.asarray(ds.images[:N]))
    groups = {idx: g for idx, (_, _, g) in sink.logits.items()}
    assert set(groups.values()) == {"0+1"}  # worker 2 never in time
    with torch.no_grad():
        want = model.heads.logits({g: model.groups[g](setup[1][0].spec.to_tensor(x.numpy())) for g in (0, 1)}).numpy()
    got = np.stack([sink.logits[i][0] for i in range(N)])
    assert np.allclose(got, want, atol=1e-4)
    s = coord.deadline.summary()
    assert s["answers_by_subset"] == {"0+1": -(-N // BATCH)}
    assert [e["rank"] for e in events.of("ha_skip")] == [2]
    assert not coord.deadline.holding()  # the late worker's last features were awaited before STOP


def test_equal_devices_answer_with_every_group(setup, monkeypatch, tmp_path):
    coord, sink, events, outcome = _run(setup, monkeypatch, tmp_path, 1, 50)
    assert outcome.status == "ok" and sorted(sink.logits) == list(range(N))
    assert {g for _, _, g in sink.logits.values()} == {"0+1+2"} and coord.deadline.late_dropped == 0
    assert events.of("ha_skip") == []


@pytest.mark.mpi
def test_a_slow_rank_under_mpirun(ckpts, tmp_path):
    """Rank 2 turns slow (50 ms a batch) after 2 batches; with --ha-deadline-ms 20 the run answers without
    it, skips it, keeps every input exactly once, and says which subset answered each batch."""
    from conftest import run_mpi

    res = run_mpi(3, ["-c", str(ckpts("fluid", 3)), "--mode", "ha", "--ha-deadline-ms", "20", "-b", "8",
                      "--limit", "600", "--kill-rank", "2:slow:2"], tmp_path)
    assert res.returncode == 0 and res.summary["exit_code"] == 0, res.stderr[-2000:]
    assert sorted(p["index"] for p in res.predictions) == list(range(600)) and res.torn == 0
    groups = {p["groups"] for p in res.predictions}
    assert "0+1" in groups and groups <= {"0+1", "0+1+2", "0", "0+2"}
    d = res.summary["ha_deadline"]
    assert sum(d["answers_by_subset"].values()) == -(-600 // 8) and d["answers_by_subset"].get("0+1", 0) > 0
    assert any(e["event"] == "ha_skip" and e["rank"] == 2 for e in res.events)
    assert res.summary["failures"] == []  # late is not lost


def test_one_hiccup_costs_only_the_batches_the_device_held():
    """Two HA batches in flight, both answered at the deadline without worker 2 (a hiccup): the next batch
    still goes to it, so it catches up instead of missing a run of batches."""
    d = HADeadline(0.008)
    assert d.send_to(1, [1, 2], 0.0, depth=2) == [1, 2] and d.send_to(2, [1, 2], 0.001, depth=2) == [1, 2]
    for b in (1, 2):
        d.arrived(1, b)
        d.answered(b, {0, 1}, 0.009)
    assert d.send_to(3, [1, 2], 0.009, depth=2) == [1, 2]  # it holds 1 and 2: one more is allowed
    assert d.send_to(4, [1, 2], 0.0095, depth=2) == [1]  # but not a fourth


def test_a_late_device_holds_at_most_depth_plus_catch_up_batches():
    d = HADeadline(0.050)
    assert d.send_to(1, [1, 2], 0.0, depth=1) == [1, 2]
    assert d.send_to(2, [1, 2], 0.01, depth=1) == [1, 2]
    d.arrived(1, 1)
    assert d.send_to(3, [1, 2], 0.02, depth=1) == [1]  # worker 2 still holds two
    d.answered(1, {0, 1}, 0.06)
    d.arrived(1, 2), d.arrived(1, 3)  # worker 1 keeps up
    assert d.send_to(4, [1, 2], 0.07, depth=1) == [1]  # batch 1, answered without 2: still in its hands
    d.arrived(2, 1)  # late features of batch 1: dropped, and a slot is free again
    assert d.late_dropped == 1 and d.send_to(5, [1, 2], 0.08, depth=1) == [1, 2]
