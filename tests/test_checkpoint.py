"""Checkpoints: round trip, per-rank export (each part loads alone), bad files."""
import torch

from fluid_mpi.model import checkpoint
from fluid_mpi.errors import CheckpointError
from fluid_mpi.model.partition import fluid_ha_forward, sliced_forward

import pytest


def test_round_trip_keeps_weights_and_meta(ckpts):
    path = ckpts("fluid", 2)
    model, meta = checkpoint.load_checkpoint(path)
    again, _ = checkpoint.load_checkpoint(path)
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(model(x), again(x))
    assert meta["family"] == "fluid" and meta["parts"] == 2 and "accuracy" in meta and "train" in meta


@pytest.mark.parametrize("family", ["fluid", "dynamic", "static"])
def test_export_parts_each_load_alone_and_match(ckpts, tmp_path, family):
    path = ckpts(family, 2)
    model, meta = checkpoint.load_checkpoint(path)
    files = checkpoint.export_parts(path, tmp_path / "parts")
    assert [f.name for f in files] == ["part-0.pt", "part-1.pt"]
    assert all(f.stat().st_size < path.stat().st_size for f in files)  # a part is smaller than the whole
    x = torch.randn(4, 1, 28, 28)
    for source in (path, tmp_path / "parts"):
        parts = [checkpoint.load_part(source, j)[0] for j in range(2)]
        with torch.no_grad():
            got = fluid_ha_forward(parts, parts[0].bank, x) if family == "fluid" else sliced_forward(parts, x)
            assert torch.allclose(got, model(x), atol=1e-5)


def test_bad_files_give_one_line_errors(ckpts, tmp_path):
    good = ckpts("static", 2)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[:1000])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    future = tmp_path / "future.pt"
    blob = torch.load(good, weights_only=True)
    blob["version"] = 99
    torch.save(blob, future)
    cases = [(lambda: checkpoint.load_checkpoint(tmp_path / "missing.pt"), "no such checkpoint", "missing.pt"),
             (lambda: checkpoint.load_checkpoint(trunc), "not a readable", trunc.name),
             (lambda: checkpoint.load_checkpoint(foreign), "not a fluid-mpi file", foreign.name),
             (lambda: checkpoint.load_checkpoint(future), "format version 99", future.name),
             (lambda: checkpoint.load_part(good, 5), "no part 5", good.name)]
    for call, reason, name in cases:
        with pytest.raises(CheckpointError, match=reason) as info:
            call()
        message = str(info.value)
        # what the CLI prints: one line (no traceback, no torch message dump) naming the file
        assert "\n" not in message and name in message, message
