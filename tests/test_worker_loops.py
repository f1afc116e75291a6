"""The worker loops (serve_fluid) and the Static/Dynamic loops (SlicedRun.coordinate/serve) against the fake
transport, which plays the other ranks: scripted coordinator messages and broadcasts, simulated slice peers,
deaths, freezes, silences and failed shrinks. No MPI; time is the fake transport's clock."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fluid_mpi.model.data import load_split, to_tensor_batch
from fluid_mpi.model.models import FluidCNN, SlicedCNN, Widths
from fluid_mpi.model.partition import FluidPart, SlicePart
from fluid_mpi.runtime.events import EventLog
from fluid_mpi.runtime.faults import FaultPlan
from fluid_mpi.runtime.liveness import coordinator_silence_limit
from fluid_mpi.runtime.outputs import PredictionSink
from fluid_mpi.runtime.protocol import CMD_FEATURES, CMD_LOGITS, CMD_RUN, CMD_STOP, RunSpec, header
from fluid_mpi.runtime.sliced import SlicedRun
from fluid_mpi.runtime.worker import WorkerEnd, serve_fluid

from fake_transport import FakeTransport

BATCH = 8
RT = 0.5  # rank_timeout (fake seconds)


@pytest.fixture(scope="module")
def data():
    return load_split(None, "test").take(40)


def job(family: str, mode: str, tmp_path, data=None, width=None) -> RunSpec:
    imgs = data.images if data is not None else np.zeros((0, 28, 28), np.uint8)
    labels = data.labels if data is not None else np.zeros(0, np.int64)
    return RunSpec(family, mode, images=imgs, labels=labels, indices=np.arange(len(imgs)), batch_size=BATCH, rank_timeout=RT,
               faults=FaultPlan(), stamp_dir=str(tmp_path), width=width)


# --- serve_fluid ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fluid():
    torch.manual_seed(0)
    model = FluidCNN(3, Widths(4, 8, 16)).eval()
    return FluidPart.from_model(model, 1).eval()


def push_batch(t: FakeTransport, data, cmd: int, b: int, delay: int = 3) -> None:
    imgs = data.images[b * BATCH:(b + 1) * BATCH]
    t.push(0, header(cmd, b, len(imgs), 5), imgs.reshape(-1).copy(), delay)


def push_stop(t: FakeTransport, code: int = 0, delay: int = 3) -> None:
    t.push(0, header(CMD_STOP, 0, 0, code), np.zeros(0, np.uint8), delay)


def replies(t: FakeTransport) -> list[tuple[list[int], np.ndarray]]:
    return [(h, p) for w, h, p in t.sent if w == 0]


def serve(t, fluid, tmp_path, monkeypatch) -> WorkerEnd:
    return serve_fluid(t, fluid, job("fluid", "ht", tmp_path), t.liveness(monkeypatch))


def test_serve_fluid_answers_batches_and_returns_code_on_stop(data, fluid, tmp_path, monkeypatch):
    t = FakeTransport(3, me=1)
    push_batch(t, data, CMD_LOGITS, 0)
    push_batch(t, data, CMD_FEATURES, 1, delay=20)
    push_stop(t, code=5, delay=40)
    end = serve(t, fluid, tmp_path, monkeypatch)
    assert end == WorkerEnd(5) and not end.coordinator_lost
    got = replies(t)
    assert [h for h, _ in got] == [[CMD_LOGITS, 0, BATCH, 10], [CMD_FEATURES, 1, BATCH, fluid.widths.hidden]]
    x = to_tensor_batch(data.images[:2 * BATCH])
    with torch.no_grad():
        assert np.allclose(got[0][1], fluid.logits(x[:BATCH]).numpy(), atol=1e-6)
        assert np.allclose(got[1][1], fluid.features(x[BATCH:]).numpy(), atol=1e-6)
    assert t.shrinks == 0


def test_serve_fluid_recovers_when_another_worker_dies(data, fluid, tmp_path, monkeypatch):
    t = FakeTransport(3, me=1)
    push_batch(t, data, CMD_LOGITS, 0)
    t.when(lambda t: len(t.sent) == 1, lambda t: t.die(2, revoke=True))  # the coordinator revokes
    push_batch(t, data, CMD_LOGITS, 1, delay=30)  # sent on the shrunk communicator
    push_stop(t, delay=60)
    end = serve(t, fluid, tmp_path, monkeypatch)
    assert end == WorkerEnd(0)
    assert t.shrinks == 1 and t.members == [0, 1]
    assert [h[1] for h, _ in replies(t)] == [0, 1]


def test_serve_fluid_reports_a_dead_coordinator(data, fluid, tmp_path, monkeypatch):
    t = FakeTransport(3, me=1)
    push_batch(t, data, CMD_LOGITS, 0)
    t.when(lambda t: len(t.sent) == 1, lambda t: t.die(0))
    end = serve(t, fluid, tmp_path, monkeypatch)
    assert end.coordinator_lost and end.code == 3 and end.lost == [0] and t.members == [1, 2]


def test_serve_fluid_kills_a_frozen_coordinator_on_its_host(data, fluid, tmp_path, monkeypatch):
    t = FakeTransport(3, me=1)
    t.freeze(0)
    t0 = t.clock()
    end = serve(t, fluid, tmp_path, monkeypatch)
    assert end.coordinator_lost and end.lost == [0] and t.kills == [0]
    assert RT <= t.clock() - t0 < 2 * RT  # noticed at the first rank_timeout of silence


def test_serve_fluid_stops_when_the_coordinator_is_silent_past_the_limit(fluid, tmp_path, monkeypatch):
    t = FakeTransport(3, me=1, far=(0,))  # the coordinator's host: not observable from here
    t0 = t.clock()
    end = serve(t, fluid, tmp_path, monkeypatch)
    assert end == WorkerEnd(3) and not end.coordinator_lost and t.kills == [] and t.shrinks == 0
    limit = coordinator_silence_limit(RT)
    assert limit <= t.clock() - t0 < limit + RT


def test_serve_fluid_waits_for_a_coordinator_silent_within_the_limit(data, fluid, tmp_path, monkeypatch):
    t = FakeTransport(3, me=1, far=(0,))
    polls = int(0.9 * coordinator_silence_limit(RT) / t.tick)
    push_batch(t, data, CMD_LOGITS, 0, delay=polls)
    push_stop(t, delay=polls + 5)
    assert serve(t, fluid, tmp_path, monkeypatch) == WorkerEnd(0)
    assert [h[1] for h, _ in replies(t)] == [0]


@pytest.mark.parametrize("why", ["shrink fails", "frozen peer takes no part"])
def test_serve_fluid_stops_when_the_shrink_fails(data, fluid, tmp_path, monkeypatch, why):
    t = FakeTransport(3, me=1, far=(2,))
    push_batch(t, data, CMD_LOGITS, 0)
    if why == "shrink fails":
        t.shrink_fails = True
        t.when(lambda t: len(t.sent) == 1, lambda t: t.die(2, revoke=True))
    else:  # rank 2 freezes on a host this rank cannot observe; the coordinator revokes
        def freeze_and_revoke(t):
            t.freeze(2, kill="fails")
            t.revoked = True

        t.when(lambda t: len(t.sent) == 1, freeze_and_revoke)
    end = serve(t, fluid, tmp_path, monkeypatch)
    assert end == WorkerEnd(3) and not end.coordinator_lost and t.shrinks == 1


# --- SlicedRun ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sliced():
    torch.manual_seed(1)
    model = SlicedCNN(3, Widths(4, 8, 16)).eval()
    return model, {j: SlicePart.from_model(model, j).eval() for j in range(3)}


class CaptureSink(PredictionSink):
    def __init__(self):
        super().__init__(None)
        self.batches: list[tuple[np.ndarray, np.ndarray, int]] = []  # (indices, logits, width)

    def write(self, batch, logits, rank, extra=None):
        self.batches.append((batch.keys.copy(), logits.copy(), (extra or {}).get("width")))
        super().write(batch, logits, rank, extra)


def coordinate(t, sliced, family, data, tmp_path, monkeypatch):
    model, parts = sliced
    sink, events = CaptureSink(), EventLog(None)
    run = SlicedRun(t, parts[0], job(family, "sliced", tmp_path, data), t.liveness(monkeypatch), sink, events)
    return run.coordinate(), sink, events


def check_sliced_logits(model, data, sink: CaptureSink) -> None:
    x = to_tensor_batch(data.images)
    with torch.no_grad():
        for idx, logits, width in sink.batches:
            assert np.allclose(logits, model(x[idx], width).numpy(), atol=1e-5), (idx, width)


def stops(t: FakeTransport) -> list[int]:
    """Codes of the STOP headers the coordinator broadcast."""
    return [int(b[3]) for k, b in t.collectives if k == "bcast" and b.dtype == np.int64 and b[0] == CMD_STOP]


def gathers(t: FakeTransport) -> int:
    return sum(k == "gather" for k, _ in t.collectives)


@pytest.mark.parametrize("family", ["static", "dynamic"])
def test_sliced_coordinate_without_failures(sliced, data, tmp_path, monkeypatch, family):
    t = FakeTransport(3, slices={1: sliced[1][1], 2: sliced[1][2]})
    o, sink, events = coordinate(t, sliced, family, data, tmp_path, monkeypatch)
    assert o.status == "ok" and o.exit_code == 0 and o.width_end == 3 and o.ranks_end == 3
    assert sink.answered == set(range(len(data))) and sink.duplicates == 0 and len(sink.batches) == 5
    check_sliced_logits(sliced[0], data, sink)
    assert stops(t) == [0] and events.of("failure") == []


def test_static_stops_on_a_lost_slice(sliced, data, tmp_path, monkeypatch):
    t = FakeTransport(3, slices={1: sliced[1][1], 2: sliced[1][2]})
    t.when(lambda t: gathers(t) == 2, lambda t: t.die(2))
    o, sink, events = coordinate(t, sliced, "static", data, tmp_path, monkeypatch)
    assert o.status == "failed" and o.exit_code == 3 and "static DNN needs every slice" in o.message
    assert len(sink.batches) == 2 and sink.duplicates == 0 and o.ranks_end == 2
    check_sliced_logits(sliced[0], data, sink)
    assert stops(t) == [3]  # every survivor is told to exit 3
    assert [f["rank"] for f in events.of("failure")] == [2] and events.of("recovered")[0]["lost"] == [2]
    assert events.of("width_switch") == []


@pytest.mark.parametrize("lost,width", [(2, 2), (1, 1)])
def test_dynamic_narrows_its_width_on_a_lost_slice(sliced, data, tmp_path, monkeypatch, lost, width):
    t = FakeTransport(3, slices={1: sliced[1][1], 2: sliced[1][2]})
    t.when(lambda t: gathers(t) == 2, lambda t: t.die(lost))
    o, sink, events = coordinate(t, sliced, "dynamic", data, tmp_path, monkeypatch)
    assert o.status == "ok" and o.width_end == width and o.ranks_end == 2
    assert sink.answered == set(range(len(data))) and sink.duplicates == 0 and len(sink.batches) == 5
    assert [w for _, _, w in sink.batches] == [3, 3] + [width] * 3
    check_sliced_logits(sliced[0], data, sink)
    [sw] = events.of("width_switch")
    assert sw["width"] == width and sw["was"] == 3 and sw["after_batch"] == 2
    assert stops(t) == [0]


def test_stalled_collective_coordinator_kills_a_stopped_peer(sliced, data, tmp_path, monkeypatch):
    t = FakeTransport(3, slices={1: sliced[1][1], 2: sliced[1][2]})
    froze, killed = [], []
    t.when(lambda t: gathers(t) == 1, lambda t: (t.freeze(2), froze.append(t.clock())))
    t.when(lambda t: t.kills, lambda t: killed.append(t.clock()))
    o, sink, events = coordinate(t, sliced, "dynamic", data, tmp_path, monkeypatch)
    assert t.kills == [2] and o.status == "ok" and o.width_end == 2
    assert RT <= killed[0] - froze[0] < 2 * RT  # killed when the collective stalled for rank_timeout
    [kill] = events.of("kill")
    assert kill["rank"] == 2 and "collective stalled" in kill["reason"]
    assert events.of("width_switch")[0]["after_batch"] == 1
    assert sink.answered == set(range(len(data))) and sink.duplicates == 0
    check_sliced_logits(sliced[0], data, sink)


def test_stalled_collective_coordinator_stops_when_nothing_can_be_killed(sliced, data, tmp_path, monkeypatch):
    t = FakeTransport(3, slices={1: sliced[1][1], 2: sliced[1][2]}, far=(2,))
    t.when(lambda t: gathers(t) == 1, lambda t: t.freeze(2, kill="fails"))
    t0 = t.clock()
    o, sink, events = coordinate(t, sliced, "dynamic", data, tmp_path, monkeypatch)
    assert o.status == "failed" and o.exit_code == 3 and "did not answer within" in o.message
    assert t.kills == [] and t.revokes == 1 and stops(t) == [] and len(sink.batches) == 1
    assert t.clock() - t0 >= RT


def script(t: FakeTransport, data, batches, width: int, n_batches: int = 5) -> None:
    for b in batches:
        imgs = data.images[b * BATCH:(b + 1) * BATCH]
        t.bcasts += [header(CMD_RUN, b, len(imgs), width, n_batches), imgs]


def serve_sliced(t, sliced, family, tmp_path, monkeypatch):
    _, parts = sliced
    run = SlicedRun(t, parts[1], job(family, "sliced", tmp_path), t.liveness(monkeypatch))
    return run.serve(), run


def gathered_logits(t: FakeTransport, width: int) -> list[np.ndarray]:
    return [full[:width].sum(0) for k, full in t.collectives if k == "gather"]


def test_sliced_serve_computes_its_slice_and_stops(sliced, data, tmp_path, monkeypatch):
    model, parts = sliced
    t = FakeTransport(3, me=1, slices={0: parts[0], 2: parts[2]})
    script(t, data, range(2), 3)
    t.bcasts.append(header(CMD_STOP, 0, 0, 0, 0))
    end, run = serve_sliced(t, sliced, "static", tmp_path, monkeypatch)
    assert end == WorkerEnd(0) and run.answered == 2
    x = to_tensor_batch(data.images[:2 * BATCH])
    with torch.no_grad():
        want = model(x).numpy()
    got = gathered_logits(t, 3)
    assert len(got) == 2 and np.allclose(np.concatenate(got), want, atol=1e-5)


def test_sliced_serve_dynamic_goes_on_at_a_smaller_width(sliced, data, tmp_path, monkeypatch):
    model, parts = sliced
    t = FakeTransport(3, me=1, slices={0: parts[0], 2: parts[2]})
    script(t, data, [0], 3)
    t.bcasts.append(lambda t: t.die(2))
    script(t, data, [1], 2)
    t.bcasts.append(header(CMD_STOP, 0, 0, 0, 0))
    end, run = serve_sliced(t, sliced, "dynamic", tmp_path, monkeypatch)
    assert end == WorkerEnd(0) and run.answered == 2 and t.members == [0, 1]
    x = to_tensor_batch(data.images[:2 * BATCH])
    with torch.no_grad():
        assert np.allclose(gathered_logits(t, 3)[0], model(x[:BATCH], 3).numpy(), atol=1e-5)
        assert np.allclose(gathered_logits(t, 2)[1], model(x[BATCH:], 2).numpy(), atol=1e-5)


def test_sliced_serve_static_waits_for_the_stop_after_a_lost_slice(sliced, data, tmp_path, monkeypatch):
    t = FakeTransport(3, me=1, slices={0: sliced[1][0], 2: sliced[1][2]})
    script(t, data, [0], 3)
    t.bcasts += [lambda t: t.die(2), header(CMD_STOP, 0, 0, 3, 0)]
    end, run = serve_sliced(t, sliced, "static", tmp_path, monkeypatch)
    assert end == WorkerEnd(3) and not end.coordinator_lost and run.answered == 1 and t.shrinks == 1


def test_sliced_serve_reports_the_coordinator_lost(sliced, data, tmp_path, monkeypatch):
    t = FakeTransport(3, me=1, slices={0: sliced[1][0], 2: sliced[1][2]})
    script(t, data, [0], 3)
    t.bcasts.append(lambda t: t.die(0))
    end, run = serve_sliced(t, sliced, "dynamic", tmp_path, monkeypatch)
    assert end.coordinator_lost and end.code == 3 and end.lost == [0] and run.answered == 1


def test_sliced_serve_kills_a_frozen_coordinator_on_its_host(sliced, data, tmp_path, monkeypatch):
    t = FakeTransport(3, me=1, slices={0: sliced[1][0], 2: sliced[1][2]})
    script(t, data, [0], 3)
    t.bcasts.append(lambda t: t.freeze(0))
    end, run = serve_sliced(t, sliced, "dynamic", tmp_path, monkeypatch)
    assert end.coordinator_lost and end.lost == [0] and t.kills == [0]


def test_sliced_serve_stops_when_the_coordinator_is_silent(sliced, data, tmp_path, monkeypatch):
    t = FakeTransport(3, me=1, far=(0,), slices={0: sliced[1][0], 2: sliced[1][2]})
    script(t, data, [0], 3)  # then nothing more
    t0 = t.clock()
    end, run = serve_sliced(t, sliced, "dynamic", tmp_path, monkeypatch)
    assert end == WorkerEnd(3) and not end.coordinator_lost and run.answered == 1 and t.kills == []
    assert t.clock() - t0 >= coordinator_silence_limit(RT)


def test_sliced_coordinate_stops_when_the_shrink_fails(sliced, data, tmp_path, monkeypatch):
    t = FakeTransport(3, slices={1: sliced[1][1], 2: sliced[1][2]})
    t.shrink_fails = True
    t.when(lambda t: gathers(t) == 2, lambda t: t.die(2))
    o, sink, events = coordinate(t, sliced, "dynamic", data, tmp_path, monkeypatch)
    assert o.status == "failed" and o.exit_code == 3 and "could not agree" in o.message
    assert t.revokes == 1 and stops(t) == [] and len(sink.batches) == 2 and events.of("width_switch") == []


def test_sliced_serve_stops_when_the_shrink_fails(sliced, data, tmp_path, monkeypatch):
    t = FakeTransport(3, me=1, slices={0: sliced[1][0], 2: sliced[1][2]})
    t.shrink_fails = True
    script(t, data, [0], 3)
    t.bcasts.append(lambda t: t.die(2))
    end, run = serve_sliced(t, sliced, "dynamic", tmp_path, monkeypatch)
    assert end == WorkerEnd(3) and not end.coordinator_lost and t.shrinks == 1
