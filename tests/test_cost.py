"""Per-device cost counts against the real modules: multiply-adds counted by hooks on every conv and
linear layer that runs, parameters summed."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fluid_mpi.model.cost import PRESETS, device_cost, parse_widths
from fluid_mpi.model.models import FluidCNN, SlicedCNN, Widths
from fluid_mpi.model.partition import FluidPart
from fluid_mpi.model.spec import InputSpec


def counted_macs(module: nn.Module, run, x: torch.Tensor | None = None) -> int:
    total = [0]

    def hook(layer, inputs, out):
        if isinstance(layer, nn.Conv2d):
            total[0] += out[0].numel() * layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
        elif isinstance(layer, nn.Linear):
            total[0] += layer.in_features * layer.out_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        run(torch.zeros(1, 1, 28, 28) if x is None else x)
    for h in handles:
        h.remove()
    return total[0]


@pytest.mark.parametrize("w", list(PRESETS.values()) + [Widths(3, 5, 7)])
@pytest.mark.parametrize("parts", [2, 4])
def test_fluid_group_cost_is_what_its_part_runs(w, parts):
    part = FluidPart(w, 0, parts)
    cost = device_cost("fluid", w, parts)
    assert cost["macs"] == counted_macs(part, part.logits)
    assert cost["params"] == sum(p.numel() for p in part.parameters())


@pytest.mark.parametrize("w", list(PRESETS.values()))
@pytest.mark.parametrize("parts", [2, 4])
def test_static_slices_add_up_to_the_whole_network(w, parts):
    """Split by output channels, the K slices compute the whole network once: their MACs add up to it."""
    model = SlicedCNN(parts, w)
    assert parts * device_cost("static", w, parts)["macs"] == counted_macs(model.trunk, model.trunk) + \
        model.classifier.in_features * model.classifier.out_features
    whole = device_cost("static-whole", w, parts)
    assert whole["params"] == sum(p.numel() for p in model.parameters())
    assert parts * device_cost("static", w, parts)["params"] == whole["params"] + (parts - 1) * 10


def test_fluid_whole_is_k_groups_and_a_static_slice_costs_more_than_a_group():
    w = PRESETS["tiny"]
    model = FluidCNN(2, w)
    assert device_cost("fluid-whole", w, 2)["macs"] == sum(
        counted_macs(g, g) for g in model.groups) + 2 * w.hidden * 10
    assert device_cost("static", w, 2)["macs"] > device_cost("fluid", w, 2)["macs"]


@pytest.mark.parametrize("spec", [InputSpec(3, 32, 32, tuple("abcd"), (0.5,) * 3, (0.2,) * 3, "resize", "cnn3"),
                                  InputSpec(1, 8, 8, tuple("ab")), InputSpec(3, 64, 48, tuple("ab"), (0.5,) * 3,
                                                                            (0.2,) * 3, "resize")])
def test_costs_of_any_input_and_trunk(spec):
    w, x = Widths(3, 5, 7), torch.zeros(1, spec.channels, spec.height, spec.width)
    part = FluidPart(w, 0, 2, spec=spec)
    assert device_cost("fluid", w, 2, spec)["macs"] == counted_macs(part, part.logits, x)
    assert device_cost("fluid", w, 2, spec)["params"] == sum(p.numel() for p in part.parameters())
    model = SlicedCNN(2, w, spec=spec)
    assert 2 * device_cost("static", w, 2, spec)["macs"] == counted_macs(model.trunk, model.trunk, x) + \
        model.classifier.in_features * model.classifier.out_features


def test_parse_widths_takes_presets_and_numbers_and_rejects_the_rest():
    assert parse_widths("tiny") == Widths(2, 4, 8) and parse_widths("4,8,16") == PRESETS["small"]
    for bad in ("huge", "1,2", "0,1,2", "a,b,c"):
        with pytest.raises(ValueError):
            parse_widths(bad)
