"""The Fluid coordinator's loop (FluidCoordinator) against the fake transport: who gets which batch, what is
re-sent after a failure, which head is used, late/out-of-order/stale replies, the liveness policy (frozen,
unreachable), a failed shrink and a drain. No MPI; time is the fake transport's clock."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from fluid_mpi.model.data import load_split, to_tensor_batch
from fluid_mpi.model.models import FluidCNN, Widths
from fluid_mpi.model.partition import FluidPart
from fluid_mpi.runtime.coordinator import FluidCoordinator
from fluid_mpi.runtime.events import EventLog
from fluid_mpi.runtime.faults import FaultPlan, stamp_death
from fluid_mpi.runtime.liveness import KILL_GRACE_S
from fluid_mpi.runtime.outputs import PredictionSink
from fluid_mpi.runtime.protocol import CMD_FEATURES, CMD_LOGITS, CMD_STOP, RunSpec

from fake_transport import FakeTransport

N, BATCH = 100, 8
N_BATCHES = -(-N // BATCH)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = FluidCNN(3, Widths(4, 8, 16)).eval()
    parts = {j: FluidPart.from_model(model, j, with_bank=True).eval() for j in range(3)}
    ds = load_split(None, "test").take(N)
    return model, parts, ds


class CaptureSink(PredictionSink):
    """A PredictionSink that also keeps the first logits, rank and groups of each input."""

    def __init__(self):
        super().__init__(None)
        self.logits: dict[int, tuple] = {}
        self.writes = 0

    def write(self, batch, logits, rank, extra=None):
        self.writes += 1
        assert len(batch.arrived) == len(batch), "every input is timed from its arrival or hand-over"
        for i, idx in enumerate(batch.keys.tolist()):
            self.logits.setdefault(idx, (logits[i].copy(), rank, (extra or {}).get("groups")))
        super().write(batch, logits, rank, extra)


@dataclass
class Run:
    t: FakeTransport
    coord: FluidCoordinator
    sink: CaptureSink
    events: EventLog
    outcome: object


def fake(setup, monkeypatch, **kw) -> FakeTransport:
    _, parts, _ = setup
    return FakeTransport(3, parts={1: parts[1], 2: parts[2]}, **kw)


def run(setup, monkeypatch, tmp_path, t: FakeTransport, mode: str, rank_timeout: float = 60.0,
        drain_after: int | None = None) -> Run:
    _, parts, ds = setup
    job = RunSpec("fluid", mode, images=ds.images, labels=ds.labels, indices=np.arange(N), batch_size=BATCH, rank_timeout=rank_timeout,
              faults=FaultPlan(), stamp_dir=str(tmp_path))
    sink, events = CaptureSink(), EventLog(None)
    box = {}
    draining = (lambda: False) if drain_after is None else (lambda: box["c"].answered_batches >= drain_after)
    # credit 2: the fault schedules below (who dies after which answer) assume 2 batches per HT worker
    coord = box["c"] = FluidCoordinator(t, parts[0], job, sink, t.liveness(monkeypatch), events, draining,
                                        clock=t.clock, credit=2)
    return Run(t, coord, sink, events, coord.run())


def check_logits(setup, r: Run, mode: str) -> None:
    """Every answer equals the in-process model: HA with the head of the groups that answered, HT the
    answering rank's own head."""
    model, _, ds = setup
    x = to_tensor_batch(ds.images)
    keys = {(g if mode == "ha" else str(rank)) for _, rank, g in r.sink.logits.values()}
    with torch.no_grad():
        want = {k: model(x, tuple(int(v) for v in k.split("+"))) for k in keys}
    for idx, (out, rank, groups) in r.sink.logits.items():
        ref = want[groups if mode == "ha" else str(rank)][idx]
        assert torch.allclose(torch.from_numpy(out), ref, atol=1e-5), idx


def check_once(r: Run, n: int = N) -> None:
    assert r.sink.answered == set(range(n)) and r.sink.duplicates == 0
    assert r.coord.answered_batches == r.sink.writes == -(-n // BATCH)  # no batch recorded twice


def answered_batches(r: Run) -> set[int]:
    return {i // BATCH for i in r.sink.answered}


def sent_batches(r: Run, worker: int | None = None) -> list[int]:
    return [h[1] for w, h, _ in r.t.sent if h[0] in (CMD_FEATURES, CMD_LOGITS) and worker in (None, w)]


@pytest.mark.parametrize("mode", ["ha", "ht"])
def test_every_input_answered_once_without_failures(setup, monkeypatch, tmp_path, mode):
    t = fake(setup, monkeypatch, delay=3)
    r = run(setup, monkeypatch, tmp_path, t, mode)
    check_once(r)
    check_logits(setup, r, mode)
    assert r.outcome.status == "ok" and r.outcome.exit_code == 0 and r.outcome.ranks_end == 3
    assert t.stops == {1: 0, 2: 0} and r.events.of("failure", "kill", "recovered") == []
    if mode == "ha":
        assert {g for _, _, g in r.sink.logits.values()} == {"0+1+2"}
        assert sorted(sent_batches(r, 1)) == sorted(sent_batches(r, 2)) == list(range(N_BATCHES))


def test_ht_spreads_work_over_every_rank(setup, monkeypatch, tmp_path):
    r = run(setup, monkeypatch, tmp_path, fake(setup, monkeypatch, delay=3), "ht")
    assert {rank for _, rank, _ in r.sink.logits.values()} == {0, 1, 2}


@pytest.mark.parametrize("mode", ["ha", "ht"])
def test_failure_resends_in_flight_batches_to_survivors(setup, monkeypatch, tmp_path, mode):
    t = fake(setup, monkeypatch, delay=2)
    t.die_after[2] = 3
    t.when(lambda t: 2 in t.dead, lambda t: stamp_death(str(tmp_path), 2, 3, "kill"))
    r = run(setup, monkeypatch, tmp_path, t, mode)
    check_once(r)
    check_logits(setup, r, mode)
    assert r.outcome.status == "ok" and r.outcome.ranks_end == 2 and t.members == [0, 1] and t.stops == {1: 0}
    held = sent_batches(r, 2)[3:]  # what rank 2 held when it died
    assert held, "rank 2 held work when it died"
    for b in held:  # re-sent and answered without rank 2
        assert all(r.sink.logits[i][1] != 2 for i in range(BATCH * b, min(BATCH * b + BATCH, N)))
        assert all(r.sink.logits[i][2] in (None, "0+1") for i in range(BATCH * b, min(BATCH * b + BATCH, N)))
    [failure] = r.events.of("failure")
    assert failure["rank"] == 2 and failure["fault"] == "process exit" and failure["how"] == "kill"
    assert failure["after_batch"] == 3 and failure["detected_from"] == "death stamp"
    [rec] = r.events.of("recovered")
    assert rec["lost"] == [2] and rec["ranks"] == 2 and rec["was"] == 3
    assert len(r.events.of("answering_again")) == 1
    kinds = [e["event"] for e in r.events.records]
    assert kinds.index("failure") < kinds.index("answering_again")
    if mode == "ha":
        assert {g for _, _, g in r.sink.logits.values()} == {"0+1+2", "0+1"}
        [hs] = r.events.of("head_switch")
        assert hs["head"] == "0+1" and hs["was"] == "0+1+2"
    else:
        kept = sum(rank == 2 for _, rank, _ in r.sink.logits.values())  # its answers before it died stay
        assert 0 < kept <= 3 * BATCH and kept % BATCH == 0
        assert r.events.of("head_switch") == []


@pytest.mark.parametrize("mode", ["ha", "ht"])
def test_late_and_out_of_order_replies(setup, monkeypatch, tmp_path, mode):
    t = fake(setup, monkeypatch, delay=lambda w, b: 25 if b % 2 == 0 else 1)  # odd batches overtake
    r = run(setup, monkeypatch, tmp_path, t, mode)
    check_once(r)
    check_logits(setup, r, mode)
    assert r.outcome.status == "ok" and r.events.of("failure") == []
    order = [b for w, b in t.delivered if w == 1]
    assert order != sorted(order), "replies did arrive out of order"


@pytest.mark.parametrize("mode", ["ha", "ht"])
def test_stale_reply_after_shrink_is_ignored(setup, monkeypatch, tmp_path, mode):
    t = fake(setup, monkeypatch, delay=lambda w, b: 40 if w == 1 else 1)
    t.late = True  # rank 1's replies sent before the shrink arrive after it
    t.die_after[2] = 2
    r = run(setup, monkeypatch, tmp_path, t, mode)
    assert t.stale > 0, "the fake delivered replies from before the shrink"
    check_once(r)
    check_logits(setup, r, mode)
    assert r.outcome.status == "ok" and r.outcome.ranks_end == 2


@pytest.mark.parametrize("mode", ["ha", "ht"])
def test_frozen_worker_killed_after_rank_timeout_then_recovered(setup, monkeypatch, tmp_path, mode):
    t = fake(setup, monkeypatch)
    t.freeze_after[2] = 2
    froze = []
    t.when(lambda t: 2 in t.frozen, lambda t: froze.append(t.clock()))
    r = run(setup, monkeypatch, tmp_path, t, mode, rank_timeout=1.0)
    check_once(r)
    check_logits(setup, r, mode)
    assert r.outcome.status == "ok" and r.outcome.ranks_end == 2 and t.kills == [2]
    killed_at = r.coord.liveness.killed[2]
    assert 1.0 - 0.05 <= killed_at - froze[0] <= 1.5  # after rank_timeout on the fake clock, not before
    [kill] = r.events.of("kill")
    assert kill["rank"] == 2 and kill["delivered"] is True and "held a batch" in kill["reason"]
    [failure] = r.events.of("failure")
    assert failure["rank"] == 2 and failure["fault"] == "silent"
    assert r.events.of("recovered")[0]["lost"] == [2]


@pytest.mark.parametrize("kill", ["fails", "ignored"])
@pytest.mark.parametrize("mode", ["ha", "ht"])
def test_unreachable_worker_stops_silent(setup, monkeypatch, tmp_path, mode, kill):
    """A frozen worker on another host: the kill cannot be delivered (fails), or is delivered but no death
    is ever reported (ignored, silent after KILL_GRACE_S): exit 4 naming its host."""
    t = fake(setup, monkeypatch, far=(2,))
    t.freeze_after[2], t.kill_mode[2] = 1, kill
    r = run(setup, monkeypatch, tmp_path, t, mode, rank_timeout=1.0)
    o = r.outcome
    assert o.status == "silent" and o.exit_code == 4 and o.silent_hosts == ("far2",) and "far2" in o.message
    assert t.revokes == 1 and t.kills == [2] and t.stops == {}
    [ev] = r.events.of("kill")
    assert ev["rank"] == 2 and ev["host"] == "far2" and ev["delivered"] is (kill == "ignored")
    if kill == "ignored":
        assert t.clock() - r.coord.liveness.killed[2] > KILL_GRACE_S
    [failure] = r.events.of("failure")
    assert failure["rank"] == 2 and failure["fault"] == "silent"
    assert r.sink.duplicates == 0 and 0 < len(r.sink.answered) < N


@pytest.mark.parametrize("mode", ["ha", "ht"])
def test_shrink_failure_stops_failed(setup, monkeypatch, tmp_path, mode):
    t = fake(setup, monkeypatch)
    t.die_after[2] = 2
    t.shrink_fails = True
    r = run(setup, monkeypatch, tmp_path, t, mode)
    o = r.outcome
    assert o.status == "failed" and o.exit_code == 3 and "could not agree" in o.message and o.silent_hosts == ()
    assert t.shrinks == 1 and t.revokes == 1 and t.stops == {}
    assert r.sink.duplicates == 0 and len(r.sink.answered) < N


@pytest.mark.parametrize("mode", ["ha", "ht"])
def test_drain_finishes_in_flight_and_stops_drained(setup, monkeypatch, tmp_path, mode):
    t = fake(setup, monkeypatch, delay=5)
    r = run(setup, monkeypatch, tmp_path, t, mode, drain_after=3)
    o = r.outcome
    assert o.status == "drained" and o.exit_code == 5 and o.ranks_end == 3
    assert len(r.events.of("drain")) == 1 and t.stops == {1: 0, 2: 0}
    done = answered_batches(r)
    assert 3 <= len(done) < N_BATCHES
    assert set(sent_batches(r)) <= done, "every batch handed out before the drain was finished"
    assert r.sink.duplicates == 0 and r.coord.answered_batches == r.sink.writes == len(done)
    assert r.sink.answered == {i for b in done for i in range(BATCH * b, min(BATCH * b + BATCH, N))}
    check_logits(setup, r, mode)


@pytest.mark.parametrize("mode", ["ha", "ht"])
def test_worker_dying_after_the_last_answer_does_not_crash_the_stop(setup, monkeypatch, tmp_path, mode):
    t = fake(setup, monkeypatch)
    send = t.send

    def send_dying(dest, hdr, payload):  # rank 2 dies just as the run ends, before its STOP is sent
        if int(hdr[0]) == CMD_STOP:
            t.die(2)
        send(dest, hdr, payload)

    t.send = send_dying
    r = run(setup, monkeypatch, tmp_path, t, mode)
    check_once(r)
    assert r.outcome.status == "ok" and r.outcome.exit_code == 0 and t.stops.get(1) == 0


@pytest.mark.parametrize("mode", ["ha", "ht"])
def test_recovery_kills_a_stopped_worker_along_with_a_dead_one(setup, monkeypatch, tmp_path, mode):
    """Rank 1 dies while rank 2 is frozen on this host: the shrink would wait for rank 2 forever, so the
    recovery path kills it first and both are shrunk away at once."""
    t = fake(setup, monkeypatch)
    t.die_after[1] = 2
    # rank 2 freezes once rank 1 has given its last answer: the coordinator hands out more work right after
    # collecting answers, and may find rank 1 dead on that send, before any poll
    t.when(lambda t: t.answers[1] >= 2, lambda t: t.freeze(2))
    r = run(setup, monkeypatch, tmp_path, t, mode)
    check_once(r)
    check_logits(setup, r, mode)
    assert r.outcome.status == "ok" and r.outcome.ranks_end == 1 and t.members == [0] and t.kills == [2]
    [kill] = r.events.of("kill")
    assert kill["rank"] == 2 and kill["reason"] == "stopped process found during recovery"
    [rec] = r.events.of("recovered")
    assert rec["lost"] == [1, 2] and rec["ranks"] == 1 and t.shrinks == 1
    assert {f["rank"]: f["fault"] for f in r.events.of("failure")} == {1: "process exit", 2: "silent"}
    if mode == "ha":
        assert r.events.of("head_switch")[0]["head"] == "0"


@pytest.mark.parametrize("batch, depth", [(1, 1), (BATCH, 2)])
def test_ha_keeps_one_batch_in_flight_at_batch_1(setup, monkeypatch, tmp_path, batch, depth):
    """Batch 1 is run for the fastest answer: the next batch waits for this one's (a second in flight
    doubled the p50 latency); larger batches keep two in flight."""
    _, parts, ds = setup
    t = fake(setup, monkeypatch, delay=3)
    job = RunSpec("fluid", "ha", images=ds.images[:24], labels=ds.labels[:24], indices=np.arange(24), batch_size=batch,
              rank_timeout=60.0, faults=FaultPlan(), stamp_dir=str(tmp_path))
    sink = CaptureSink()
    coord = FluidCoordinator(t, parts[0], job, sink, t.liveness(monkeypatch), EventLog(None), clock=t.clock)
    in_flight, send = [], coord.send

    def spy(world, b, cmd):
        in_flight.append(len(coord.ha) + 1)  # the batches in flight once this one is
        send(world, b, cmd)

    coord.send = spy
    assert coord.run().status == "ok" and sink.answered == set(range(24))
    assert max(in_flight) == depth


@pytest.mark.parametrize("batch, credit", [(BATCH, 4), (64, 2)])
def test_ht_workers_hold_their_credit(setup, monkeypatch, tmp_path, batch, credit):
    """An HT worker holds up to 4 batches below batch 64 (2 left it waiting there), 2 from batch 64 on."""
    _, parts, ds = setup
    t = fake(setup, monkeypatch, delay=3)
    n = 6 * 3 * batch  # enough batches for every worker to be handed its full credit
    images = np.resize(ds.images, (n,) + ds.images.shape[1:])
    job = RunSpec("fluid", "ht", images=images, labels=np.resize(ds.labels, n), indices=np.arange(n), batch_size=batch,
              rank_timeout=60.0, faults=FaultPlan(), stamp_dir=str(tmp_path))
    sink = CaptureSink()
    coord = FluidCoordinator(t, parts[0], job, sink, t.liveness(monkeypatch), EventLog(None), clock=t.clock)
    held, send = [], coord.send

    def spy(world, b, cmd):
        send(world, b, cmd)
        held.append(len(coord.ht.get(world, {})) + 1)  # this worker's batches once this one is

    coord.send = spy
    assert coord.run().status == "ok" and sink.answered == set(range(n))
    assert max(held) == credit

