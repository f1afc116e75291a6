"""Model families and the partitioned forward: each split equals the unsplit model."""
import pytest
import torch

import torch.nn.functional as F

from fluid_mpi.model.models import FluidCNN, SlicedCNN, Widths, all_subsets, build_model, relu_pool, subset_key
from fluid_mpi.model.partition import FluidPart, SlicePart, fluid_ha_forward, narrow, sliced_forward


@pytest.fixture
def x():
    torch.manual_seed(0)
    return torch.randn(5, 1, 28, 28)


@pytest.mark.parametrize("family", ["static", "dynamic", "fluid"])
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_shapes(family, parts, x):
    model = build_model(family, parts, Widths(4, 8, 16))
    assert model(x).shape == (5, 10)


@pytest.mark.parametrize("parts", [2, 3])
def test_sliced_partition_equals_unsplit_at_every_width(parts, x):
    torch.manual_seed(1)
    model = SlicedCNN(parts, Widths(4, 6, 8)).eval()
    for width in range(1, parts + 1):
        split = [SlicePart.from_model(model, j, width) for j in range(width)]
        assert torch.allclose(sliced_forward(split, x), model(x, width), atol=1e-5)


def test_narrowed_slice_equals_width_k_slice(x):
    model = SlicedCNN(3, Widths(4, 6, 8)).eval()
    full = [SlicePart.from_model(model, j) for j in range(3)]
    for width in (1, 2):
        narrowed = [narrow(full[j], width) for j in range(width)]
        assert torch.allclose(sliced_forward(narrowed, x), model(x, width), atol=1e-5)


def test_width_k_uses_only_first_k_slices(x):
    """Dynamic width 1 must not depend on slice 1's weights (that is what makes it slimmable)."""
    model = SlicedCNN(2, Widths(4, 6, 8)).eval()
    before = model(x, 1)
    with torch.no_grad():
        model.trunk.conv1.weight[4:] += 1.0
        model.trunk.conv2.weight[6:] += 1.0
    assert torch.allclose(model(x, 1), before)
    assert not torch.allclose(model(x, 2), before)


@pytest.mark.parametrize("parts", [2, 3])
def test_fluid_ha_partition_equals_unsplit_for_every_subset(parts, x):
    torch.manual_seed(2)
    model = FluidCNN(parts, Widths(4, 6, 8)).eval()
    split = [FluidPart.from_model(model, j, with_bank=True) for j in range(parts)]
    for subset in all_subsets(parts):
        got = fluid_ha_forward([split[j] for j in subset], split[0].bank, x)
        assert torch.allclose(got, model(x, subset), atol=1e-5), subset_key(subset)
    for j in range(parts):
        assert torch.allclose(split[j].logits(x), model(x, (j,)), atol=1e-5)


def test_fluid_groups_are_independent(x):
    """No cross-group connections: changing group 1 leaves group 0's features untouched."""
    model = FluidCNN(2, Widths(4, 6, 8)).eval()
    f0 = model.features(x, [0])[0]
    with torch.no_grad():
        for p in model.groups[1].parameters():
            p.add_(1.0)
    assert torch.allclose(model.features(x, [0])[0], f0)


def test_avg_combine_is_mean_of_log_probs(x):
    model = FluidCNN(2, Widths(4, 6, 8)).eval()
    feats = model.features(x)
    want = torch.stack([torch.log_softmax(model.heads.single[g](feats[g]), 1) for g in (0, 1)]).mean(0)
    assert torch.allclose(model.heads.logits(feats, "avg"), want)
    with pytest.raises(ValueError):
        model.heads.logits(feats, "vote")


def test_subsets_cover_every_non_empty_subset():
    assert [subset_key(s) for s in all_subsets(3)] == ["0", "1", "2", "0+1", "0+2", "1+2", "0+1+2"]
    assert set(FluidCNN(3).heads.combined) == {"0+1", "0+2", "1+2", "0+1+2"}


def test_bad_family_and_width():
    with pytest.raises(ValueError):
        build_model("huge", 2)
    with pytest.raises(ValueError):
        SlicedCNN(2)(torch.zeros(1, 1, 28, 28), width=3)


@pytest.mark.parametrize("shape", [(64, 16, 24, 24), (3, 32, 8, 8), (1, 4, 7, 9)])
def test_fast_relu_pool_is_bit_identical_to_max_pool_of_relu(shape):
    torch.manual_seed(1)
    x = torch.randn(*shape)
    x[0, 0, 0, :2] = 0.0  # ties, and zeros on both sides of the ReLU
    want = F.max_pool2d(F.relu(x), 2)
    with torch.no_grad():
        got = relu_pool(x)
    assert got.shape == want.shape
    assert torch.equal(got, want)


def test_relu_pool_keeps_max_pool_gradients_when_training():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    relu_pool(x).sum().backward()
    got = x.grad.clone()
    x.grad = None
    F.max_pool2d(F.relu(x), 2).sum().backward()
    assert torch.equal(got, x.grad)
