"""The user's own data sets: a folder per class, a .npz, IDX files of another size; models for any input
shape and class count; checkpoints that record their input; the whole path from a colour image folder
to a served model with a rank killed mid-run (real mpirun), and the UCI 8 × 8 digits."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from fluid_mpi.cli import cli
from fluid_mpi.errors import DataError
from fluid_mpi.model import data
from fluid_mpi.model.checkpoint import load_checkpoint, load_part, save_checkpoint
from fluid_mpi.model.models import Widths, build_model
from fluid_mpi.model.partition import FluidPart, SlicePart, narrow, sliced_forward
from fluid_mpi.model.spec import MNIST, InputSpec, geometry
from tests.conftest import run_mpi
from tests.own_data import NAMES, colour_digit_folder, uci_digits, uci_digits_npz

W = Widths(2, 4, 8)


def _png(path: Path, size=(10, 12), colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


# ------------------------------------------------------------------------------------------- loaders

def test_folder_per_class_split_sizes_colour_and_skipped(tmp_path):
    for c, name in enumerate(["cat", "ant", "bee"]):
        for i in range(10):
            _png(tmp_path / name / f"{i}.png", size=(10, 12) if i < 7 else (20, 20), colour=(30 * c, 200, 90))
    (tmp_path / "bee" / "broken.png").write_bytes(b"not an image")
    train, test = data.load_split(tmp_path, "train"), data.load_split(tmp_path, "test")
    assert train.classes == ("ant", "bee", "cat")  # sorted folder names, as ImageFolder
    assert train.images.shape[1:] == (12, 10, 3) and test.images.shape[1:] == (12, 10, 3)  # most common (H, W)
    assert len(train) == 24 and len(test) == 6  # 20 % of each class held out
    assert sorted(np.bincount(test.labels).tolist()) == [2, 2, 2]
    assert len(train.skipped) == 1 and "broken.png" in train.skipped[0] and "1 unreadable" in train.source
    again = data.load_split(tmp_path, "test")
    assert np.array_equal(again.images, test.images)  # the held-out draw is fixed
    sized = data.load_split(tmp_path, "train", shape=(None, 16, 16), test_fraction=0.5)
    assert sized.images.shape[1:] == (16, 16, 3) and len(sized) == 15


def test_folder_with_train_and_test_and_grey_pictures(tmp_path):
    for split, n in (("train", 4), ("test", 2)):
        for name in ("a", "b"):
            for i in range(n):
                Image.new("L", (9, 9), 40 * i).save(tmp_path / split / name / f"{i}.png") if \
                    (tmp_path / split / name).mkdir(parents=True, exist_ok=True) is None else None
    train, test = data.load_split(tmp_path, "train"), data.load_split(tmp_path, "test")
    assert (len(train), len(test)) == (8, 4) and train.images.shape[1:] == (9, 9)  # grey: one channel
    spec = data.spec_for(train)
    assert (spec.channels, spec.height, spec.num_classes, spec.prepare) == (1, 9, 2, "resize")


def test_npz_and_idx_of_other_sizes(tmp_path):
    path = uci_digits_npz(tmp_path / "digits.npz")
    train, test = data.load_split(path, "train"), data.load_split(path, "test")
    assert train.images.shape[1:] == (8, 8) and len(train) + len(test) == 1797 and train.classes == NAMES
    x, y = uci_digits()
    for split, name in (("train", "train-images-idx3-ubyte"), ("test", "t10k-images-idx3-ubyte")):
        head = np.array([0x00000803, len(x), 8, 8], ">u4").tobytes()
        (tmp_path / name).write_bytes(head + x.tobytes())
        lab = name.replace("images-idx3", "labels-idx1")
        (tmp_path / lab).write_bytes(np.array([0x00000801, len(y)], ">u4").tobytes() + y.astype(np.uint8).tobytes())
    idx = data.load_split(tmp_path, "test")
    assert idx.images.shape == (1797, 8, 8) and idx.prepare == "resize" and "IDX 8x8" in idx.source


@pytest.mark.parametrize("arrays, message", [
    ({"x_train": np.zeros((4, 8, 8), np.uint8), "y_train": np.zeros(3, np.int64)}, "missing array"),
    ({"x_train": np.zeros((4, 8, 8), np.uint8), "y_train": np.zeros(3, np.int64),
      "x_test": np.zeros((2, 8, 8), np.uint8), "y_test": np.zeros(2, np.int64)}, "has 4 images but y_train has 3"),
    ({"x_train": np.zeros((2, 8, 8), np.uint8), "y_train": np.array([0, 1]), "x_test": np.zeros((1, 8, 8), np.uint8),
      "y_test": np.array([2]), "classes": np.array(["a", "b"])}, "label 2 out of range 0..1"),
    ({"x_train": np.zeros((2, 8, 8), np.uint8), "y_train": np.array([0, 0]), "x_test": np.zeros((1, 8, 8), np.uint8),
      "y_test": np.array([0])}, "a single class"),
])
def test_bad_npz_one_line(tmp_path, arrays, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=message):
        data.load_split(tmp_path / "d.npz", "train")


def test_bad_folders_exit_2_with_one_line(tmp_path):
    (tmp_path / "one" / "only").mkdir(parents=True)
    _png(tmp_path / "one" / "only" / "a.png")
    _png(tmp_path / "hollow" / "a" / "x.png")
    (tmp_path / "hollow" / "b").mkdir()
    (tmp_path / "hollow" / "b" / "x.png").write_bytes(b"junk")
    (tmp_path / "empty").mkdir()
    for folder, message in (("one", "1 class folder(s)"), ("hollow", "class 'b' has no readable image"),
                            ("empty", "missing MNIST file")):
        r = CliRunner().invoke(cli, ["train", "--family", "fluid", "--data", str(tmp_path / folder),
                                     "--out", str(tmp_path / "m.pt")])
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
        assert len([line for line in r.output.splitlines() if line.startswith("fluid-mpi: error")]) == 1


# -------------------------------------------------------------------------------------------- models

@pytest.mark.parametrize("spec", [
    InputSpec(1, 8, 8, tuple("ab")), InputSpec(3, 32, 32, tuple(NAMES), (0.5,) * 3, (0.25,) * 3, "resize"),
    InputSpec(3, 224, 160, tuple(str(i) for i in range(1000)), (0.5,) * 3, (0.25,) * 3, "resize"),
    InputSpec(3, 32, 32, tuple(NAMES), (0.5,) * 3, (0.25,) * 3, "resize", "cnn3"),
    InputSpec(1, 8, 8, tuple("abc"), arch="cnn3"),
])
def test_every_family_takes_any_input_and_splits_exactly(spec):
    x = spec.to_tensor(np.random.default_rng(0).integers(0, 256, (3, *spec.image_shape), dtype=np.uint8))
    for family in ("static", "dynamic", "fluid"):
        model = build_model(family, 2, W, spec=spec).eval()
        with torch.no_grad():
            out = model(x)
            assert out.shape == (3, spec.num_classes)
            if family == "fluid":
                parts = [FluidPart.from_model(model, g) for g in range(2)]
                split = model.heads.logits({p.index: p.features(x) for p in parts})
            else:
                split = sliced_forward([SlicePart.from_model(model, j) for j in range(2)], x)
            if family == "dynamic":  # width 1: slice 0 alone, narrowed from its width-2 part
                alone = sliced_forward([narrow(SlicePart.from_model(model, 0), 1)], x)
                assert torch.allclose(model(x, 1), alone, atol=1e-5)
        assert torch.allclose(out, split, atol=1e-5)


def test_mnist_geometry_is_the_papers():
    g = geometry(MNIST)
    assert (g.kernel, g.pad, g.convs, g.stages, g.pooled) == (5, 0, ((24, 24), (8, 8)), ((12, 12), (4, 4)), (4, 4))
    assert build_model("fluid", 2, W).groups[0].fc.in_features == W.c2 * 16


def test_colour_normalisation_matches_torch():
    spec = InputSpec(3, 8, 8, tuple("ab"), (0.2, 0.4, 0.6), (0.1, 0.2, 0.3), "resize")
    imgs = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    ref = (torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255 - torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1)) \
        / torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    assert torch.allclose(spec.to_tensor(imgs), ref, atol=1e-6)


def test_checkpoint_without_input_is_mnist_and_new_ones_round_trip(tmp_path):
    spec = InputSpec(3, 16, 16, ("x", "y", "z"), (0.5,) * 3, (0.25,) * 3, "resize")
    model = build_model("fluid", 2, W, spec=spec)
    meta = {"family": "fluid", "parts": 2, "widths": W.as_dict(), "input": spec.as_dict()}
    save_checkpoint(tmp_path / "c.pt", model, meta)
    loaded, _ = load_checkpoint(tmp_path / "c.pt")
    part, _ = load_part(tmp_path / "c.pt", 1)
    assert loaded.spec == spec and part.spec == spec and part.head.out_features == 3
    old = {k: v for k, v in meta.items() if k != "input"}
    save_checkpoint(tmp_path / "old.pt", build_model("fluid", 2, W), old)
    assert load_checkpoint(tmp_path / "old.pt")[0].spec == MNIST


# -------------------------------------------------------------------------------- end to end

def _invoke(args: list[str]) -> str:
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    return r.output


def test_uci_digits_train_and_eval(tmp_path):
    npz = uci_digits_npz(tmp_path / "digits.npz")
    out = json.loads(_invoke(["train", "--family", "fluid", "-k", "2", "--widths", "small", "--epochs", "15",
                              "--data", str(npz), "--out", str(tmp_path / "f.pt"), "--json"]))
    assert out["accuracy"]["full"] > 85.0, out  # 8 x 8 digits: a small model learns them well
    ev = json.loads(_invoke(["eval", str(tmp_path / "f.pt"), "--data", str(npz), "--json"]))
    assert ev["accuracy"] == out["accuracy"]
    meta = load_checkpoint(tmp_path / "f.pt")[1]
    assert (meta["input"]["height"], meta["input"]["classes"][3]) == (8, "three")


@pytest.mark.mpi
def test_colour_folder_to_a_served_model_with_a_rank_killed(tmp_path):
    """The README's path: a folder of the user's colour pictures -> train -> export -> mpirun infer --input,
    rank 1 killed mid-run: every picture answered exactly once, with its class name."""
    root = colour_digit_folder(tmp_path / "pictures", per_class=30)
    _invoke(["train", "--family", "fluid", "-k", "2", "--widths", "small", "--epochs", "3", "--data", str(root),
             "--arch", "cnn3", "--out", str(tmp_path / "f.pt")])
    _invoke(["export", str(tmp_path / "f.pt"), "--out-dir", str(tmp_path / "parts")])
    serve = tmp_path / "serve"
    serve.mkdir()
    for i, p in enumerate(sorted(root.glob("*/*.png"))[::2]):  # 150 pictures, names not revealing the class
        p_new = serve / f"{i:04d}.png"
        p_new.write_bytes(p.read_bytes())
    res = run_mpi(2, ["-c", str(tmp_path / "parts"), "--input", str(serve), "-b", "4", "--mode", "ht",
                      "--kill-rank", "1:kill:5"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(p["index"] for p in res.predictions) == list(range(150)) and res.torn == 0
    assert all(p["class"] == sorted(NAMES)[p["pred"]] for p in res.predictions)  # classes: folder names, sorted
    assert [f["rank"] for f in res.summary["failures"]] == [1]
    spec = load_checkpoint(tmp_path / "f.pt")[0].spec
    assert (spec.channels, spec.height, spec.arch, spec.prepare) == (3, 32, "cnn3", "resize")


@pytest.mark.mpi
@pytest.mark.parametrize("family", ["static", "dynamic"])
def test_sliced_families_on_colour_pictures_over_mpi(tmp_path, family):
    """Static and Dynamic with the cnn3 trunk (four exchanged stages) over a real mpirun on a colour
    folder's test split (--data): the distributed answers are the model's own, in-process."""
    root = colour_digit_folder(tmp_path / "pictures", per_class=10)
    _invoke(["train", "--family", family, "-k", "2", "--widths", "tiny", "--epochs", "1", "--data", str(root),
             "--arch", "cnn3", "--out", str(tmp_path / "m.pt")])
    res = run_mpi(2, ["-c", str(tmp_path / "m.pt"), "--data", str(root), "-b", "3"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    model, meta = load_checkpoint(tmp_path / "m.pt")
    test = data.load_split(root, "test", shape=(3, 32, 32))
    with torch.no_grad():
        want = model(model.spec.to_tensor(test.images)).numpy()
    got = np.array([p["logits"] for p in sorted(res.predictions, key=lambda p: p["index"])], np.float32)
    assert got.shape == want.shape and np.allclose(got, want, atol=1e-4)
    assert res.summary["accuracy"] == pytest.approx(meta["accuracy"]["full"], abs=0.01)
