"""The Fluid coordinator's logic against a fake transport: who gets which batch, what is re-sent after a
failure, which head is used. No MPI."""
import numpy as np
import pytest
import torch

from fluid_mpi.runtime.coordinator import FluidCoordinator
from fluid_mpi.model.data import load_split, to_tensor_batch
from fluid_mpi.model.models import FluidCNN, Widths
from fluid_mpi.runtime.outputs import PredictionSink
from fluid_mpi.model.partition import FluidPart
from fluid_mpi.runtime.protocol import Job

from fake_transport import FakeTransport


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = FluidCNN(3, Widths(4, 8, 16)).eval()
    parts = {j: FluidPart.from_model(model, j, with_bank=True).eval() for j in range(3)}
    ds = load_split(None, "test").take(100)
    return model, parts, ds


def run(setup, mode, die_after=None):
    model, parts, ds = setup
    t = FakeTransport(parts, die_after)
    job = Job("fluid", mode, ds.images, ds.labels, np.arange(len(ds)), batch_size=8)
    sink = PredictionSink(None)
    logits = {}
    orig = sink.write

    def capture(indices, labels, out, rank, extra=None):
        for i, idx in enumerate(indices.tolist()):
            logits.setdefault(idx, (out[i].copy(), rank, (extra or {}).get("groups")))
        orig(indices, labels, out, rank, extra)

    sink.write = capture
    outcome = FluidCoordinator(t, parts[0], job, sink, [("fake", 0)] * 3).run()
    return t, sink, outcome, logits, model, ds


@pytest.mark.parametrize("mode", ["ha", "ht"])
def test_every_input_answered_once_without_failures(setup, mode):
    t, sink, outcome, logits, model, ds = run(setup, mode)
    assert sink.answered == set(range(100)) and sink.duplicates == 0
    assert outcome["failures"] == [] and outcome["ranks_end"] == 3 and t.stops == {1, 2}
    x = to_tensor_batch(ds.images)
    with torch.no_grad():
        for idx, (out, rank, _groups) in logits.items():
            want = model(x[idx:idx + 1]) if mode == "ha" else model(x[idx:idx + 1], (rank,))
            assert torch.allclose(torch.from_numpy(out), want[0], atol=1e-5)


def test_ht_spreads_work_over_every_rank(setup):
    _, _, _, logits, _, _ = run(setup, "ht")
    assert {rank for _, rank, _ in logits.values()} == {0, 1, 2}


@pytest.mark.parametrize("mode", ["ha", "ht"])
def test_failure_resends_in_flight_batches_to_survivors(setup, mode):
    t, sink, outcome, logits, model, ds = run(setup, mode, die_after={2: 3})
    assert sink.answered == set(range(100)) and sink.duplicates == 0
    assert [f["rank"] for f in outcome["failures"]] == [2] and outcome["ranks_end"] == 2
    dead_batches = [b for w, b in t.sent_batches if w == 2][3:]  # what rank 2 held when it died
    assert dead_batches, "rank 2 held work when it died"
    for b in dead_batches:  # re-sent: answered by a survivor
        assert all(logits[i][1] != 2 for i in range(8 * b, min(8 * b + 8, 100)))
    if mode == "ha":
        groups = {g for _, _, g in logits.values()}
        assert groups == {"0+1+2", "0+1"}  # the head switched to the survivors' subset
        x = to_tensor_batch(ds.images)
        with torch.no_grad():
            for idx, (out, _, g) in logits.items():
                subset = tuple(int(v) for v in g.split("+"))
                assert torch.allclose(torch.from_numpy(out), model(x[idx:idx + 1], subset)[0], atol=1e-5)
    else:
        kept = sum(rank == 2 for _, rank, _ in logits.values())  # answers received before it died stay
        assert 0 < kept <= 3 * 8 and kept % 8 == 0
