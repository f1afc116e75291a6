"""Training: nested incremental training freezes earlier groups; runs are deterministic."""
import torch

from fluid_mpi.model import data
from fluid_mpi.model.evaluate import accuracy_report, combine_advice
from fluid_mpi.model.models import Widths
from fluid_mpi.model.train import TrainConfig, train


def _snap(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_nested_training_freezes_earlier_groups():
    snaps = {}

    def on_stage_end(name, model):
        snaps[name] = {"g0": _snap(model.groups[0]), "h0": _snap(model.heads.single[0]),
                       "g1": _snap(model.groups[1]), "g2": _snap(model.groups[2]),
                       "h01": _snap(model.heads.head((0, 1)))}

    cfg = TrainConfig("fluid", 3, Widths(4, 8, 16), epochs=1, limit=256, seed=3, method="nested")
    train(cfg, data.load_split(None, "train"), progress=False, on_stage_end=on_stage_end)
    assert list(snaps) == ["group0", "group1", "group2", "subset_heads"]
    for later in ("group1", "group2", "subset_heads"):
        for key in ("g0", "h0"):  # group 0 and its head never change after stage 1
            assert all(torch.equal(snaps["group0"][key][k], snaps[later][key][k]) for k in snaps["group0"][key])
    # group 1 and the 0+1 head are frozen from stage 3 on; group 2 changes in stage 3
    assert all(torch.equal(snaps["group1"]["g1"][k], snaps["group2"]["g1"][k]) for k in snaps["group1"]["g1"])
    assert all(torch.equal(snaps["group1"]["h01"][k], snaps["subset_heads"]["h01"][k])
               for k in snaps["group1"]["h01"])
    assert not all(torch.equal(snaps["group1"]["g2"][k], snaps["group2"]["g2"][k]) for k in snaps["group1"]["g2"])


def test_training_is_deterministic_and_learns():
    ds = data.load_split(None, "train")
    cfg = TrainConfig("dynamic", 2, Widths(8, 16, 32), epochs=2, limit=1000, seed=7)
    a, _ = train(cfg, ds, progress=False)
    b, _ = train(cfg, ds, progress=False)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    acc = accuracy_report(a, "dynamic", data.load_split(None, "test").take(300))
    assert set(acc["subsets"]) == {"1", "2"}
    assert acc["full"] > 60.0  # 1000 images, two epochs: far above chance (10 %)


def test_fluid_report_has_every_subset_and_both_combiners():
    cfg = TrainConfig("fluid", 2, Widths(4, 8, 16), epochs=1, limit=256, seed=0)
    model, log = train(cfg, data.load_split(None, "train"), progress=False)
    acc = accuracy_report(model, "fluid", data.load_split(None, "test").take(100))
    assert set(acc["subsets"]) == {"0", "1", "0+1"} and set(acc["subsets_avg"]) == {"0+1"}
    assert acc["full"] == acc["subsets"]["0+1"]
    assert log["train_images"] == 256 and log["train_seconds"] > 0


def test_combine_advice_names_the_way_that_scored_higher():
    acc = {"subsets": {"0": 98.0, "1": 98.2, "2": 97.9, "0+1": 99.0, "0+2": 98.9, "1+2": 99.1, "0+1+2": 99.2},
           "subsets_avg": {"0+1": 99.1, "0+2": 99.0, "1+2": 99.2, "0+1+2": 99.5}}
    text = combine_advice(acc)
    assert "all groups 99.20 with the trained head, 99.50 averaging" in text
    assert "99.05 against 99.20: averaging scored higher (pass --combine avg to infer)" in text
    acc["subsets_avg"] = {k: v - 0.5 for k, v in acc["subsets_avg"].items()}
    assert combine_advice(acc).endswith("the trained heads scored higher")


def test_folded_batchnorm_computes_what_the_trained_trunk_did():
    from fluid_mpi.model.models import Trunk

    torch.manual_seed(0)
    trunk = Trunk(Widths(3, 5, 7), norm=True)
    for bn in trunk.norms:  # statistics and affine parameters far from the identity
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
    trunk.eval()
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        before = trunk(x)
        trunk.fold_norm()
        after = trunk(x)
    assert trunk.norms is None and not any("norms" in k for k in trunk.state_dict())
    assert torch.allclose(before, after, atol=1e-5)


def test_joint_training_is_deterministic_and_leaves_the_plain_layers():
    """The default Fluid recipe: two runs of a seed are equal to the bit, and the model has exactly the
    layers of an untrained one (BatchNorm folded away), so checkpoints and devices are as before."""
    from fluid_mpi.model.models import build_model

    ds = data.load_split(None, "train")
    cfg = TrainConfig("fluid", 2, Widths(2, 4, 8), epochs=1, limit=300, seed=5)
    a, log = train(cfg, ds, progress=False)
    b, _ = train(cfg, ds, progress=False)
    assert list(log["stage_losses"]) == ["joint"]
    assert a.state_dict().keys() == build_model("fluid", 2, Widths(2, 4, 8)).state_dict().keys()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_joint_training_beyond_four_groups_fits_every_combined_head():
    cfg = TrainConfig("fluid", 5, Widths(2, 2, 4), epochs=1, limit=128, seed=0)
    model, log = train(cfg, data.load_split(None, "train"), progress=False)
    assert len(log["stage_losses"]["subset_heads_trained"]) == 2 ** 5 - 1 - 5  # every subset of 2 or more
