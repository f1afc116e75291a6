"""Sub-network partitioning: the piece of each model family that one device (one MPI rank) holds,
and the partitioned forward in plain torch, against which the MPI runtime is checked.

- :class:`SlicePart` (Static, Dynamic): part j of width k holds output-channel slice j of every layer and
  slice j of the classifier's input columns. A forward is three stages; between stages 0->1 and 1->2 the
  parts' outputs are concatenated along channels (an allgather on a cluster); the stage-2 outputs are
  partial logits that are summed (a reduce). Part 0 alone carries the classifier bias.
- :class:`FluidPart`: part j is group j's trunk and its independent head. The coordinator also holds the
  :class:`~fluid_mpi.models.HeadBank` to classify from any subset of groups' features.

Parts take and return tensors; the runtime decides how tensors travel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .models import FluidCNN, HeadBank, SlicedCNN, Trunk, Widths, fit_pool, relu_pool
from .spec import MNIST, InputSpec, geometry

N_STAGES = 3


class SlicePart(nn.Module):
    """Part ``index`` of a :class:`SlicedCNN` running at ``width`` slices (index < width)."""

    def __init__(self, widths: Widths, index: int, width: int, spec: InputSpec = MNIST):
        super().__init__()
        if not 0 <= index < width:
            raise ValueError(f"part index {index} outside width {width}")
        self.widths, self.index, self.width, self.spec = widths, index, width, spec
        w, self.geo = widths, geometry(spec)
        self.conv1 = nn.Conv2d(spec.channels, w.c1, 5, padding=self.geo.pad)
        self.conv2 = nn.Conv2d(w.c1 * width, w.c2, 5, padding=self.geo.pad)
        self.fc = nn.Linear(w.c2 * width * self.geo.pooled_size, w.hidden)
        self.cls_weight = nn.Parameter(torch.zeros(spec.num_classes, w.hidden))
        # only part 0 adds the bias, so that the sum of partial logits counts it once
        self.cls_bias = nn.Parameter(torch.zeros(spec.num_classes))

    @classmethod
    def from_model(cls, model: SlicedCNN, index: int, width: int | None = None) -> "SlicePart":
        width = model.parts if width is None else width
        part = cls(model.widths, index, width, model.spec)
        part.load_state_dict(slice_state(model, index, width))
        return part

    def stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Run stage ``i`` on the full (gathered) input of that stage; returns this part's share."""
        if i == 0:
            return relu_pool(self.conv1(x))
        if i == 1:  # each part pools its own channels: the gathered maps are what fc reads
            return fit_pool(relu_pool(self.conv2(x)), self.geo.pooled)
        if i == 2:
            return F.linear(F.relu(self.fc(x.flatten(1))), self.cls_weight, self.cls_bias)
        raise IndexError(i)

    def stage_shape(self, i: int, n: int) -> tuple[int, ...]:
        """The shape of this part's share of stage ``i``'s output for a batch of ``n``."""
        w, g = self.widths, self.geo
        return [(n, w.c1, *g.stage1), (n, w.c2, *g.pooled), (n, self.spec.num_classes)][i]


def slice_state(model: SlicedCNN, index: int, width: int) -> dict[str, torch.Tensor]:
    """The weights part ``index`` needs at ``width`` (copies, so the full model can be freed)."""
    w = model.widths
    full = model.sliced_weights(width)

    def rows(t, n):
        return t[index * n:(index + 1) * n].detach().clone()

    return {
        "conv1.weight": rows(full["conv1.weight"], w.c1), "conv1.bias": rows(full["conv1.bias"], w.c1),
        "conv2.weight": rows(full["conv2.weight"], w.c2), "conv2.bias": rows(full["conv2.bias"], w.c2),
        "fc.weight": rows(full["fc.weight"], w.hidden), "fc.bias": rows(full["fc.bias"], w.hidden),
        "cls_weight": full["classifier.weight"][:, index * w.hidden:(index + 1) * w.hidden].detach().clone(),
        "cls_bias": full["classifier.bias"].detach().clone() if index == 0
        else torch.zeros_like(full["classifier.bias"]),
    }


def sliced_forward(parts: list[SlicePart], x: torch.Tensor) -> torch.Tensor:
    """The distributed Static/Dynamic forward simulated in one process (allgather = concatenation)."""
    shared = x
    for i in range(N_STAGES):
        outs = [p.stage(i, shared) for p in parts]
        shared = torch.cat(outs, dim=1) if i < N_STAGES - 1 else torch.stack(outs).sum(0)
    return shared


class FluidPart(nn.Module):
    """Group ``index`` of a Fluid model: its trunk and independent head; optionally the whole head bank
    (the coordinator's copy, used to combine features gathered from any subset of groups)."""

    def __init__(self, widths: Widths, index: int, parts: int, with_bank: bool = False, spec: InputSpec = MNIST):
        super().__init__()
        self.widths, self.index, self.parts, self.spec = widths, index, parts, spec
        self.trunk = Trunk(widths, spec=spec)
        self.head = nn.Linear(widths.hidden, spec.num_classes)
        self.bank = HeadBank(parts, widths.hidden, spec.num_classes) if with_bank else None

    @classmethod
    def from_model(cls, model: FluidCNN, index: int, with_bank: bool = False) -> "FluidPart":
        part = cls(model.widths, index, model.parts, with_bank, model.spec)
        part.load_state_dict(fluid_state(model, index, with_bank))
        return part

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def fluid_state(model: FluidCNN, index: int, with_bank: bool) -> dict[str, torch.Tensor]:
    """The weights group ``index`` needs (copies); with the head bank for the coordinator."""
    state = {f"trunk.{k}": v.detach().clone() for k, v in model.groups[index].state_dict().items()}
    state.update({f"head.{k}": v.detach().clone() for k, v in model.heads.single[index].state_dict().items()})
    if with_bank:
        state.update({f"bank.{k}": v.detach().clone() for k, v in model.heads.state_dict().items()})
    return state


def fluid_ha_forward(parts: list[FluidPart], bank: HeadBank, x: torch.Tensor, combine: str = "head"):
    """High-Accuracy mode simulated in one process: every part sees ``x``; the bank combines."""
    return bank.logits({p.index: p.features(x) for p in parts}, combine)


def narrow(part: SlicePart, width: int) -> SlicePart:
    """The same slice of a Dynamic model at a smaller ``width``: drop the input channels of the slices
    that are gone (the weights are shared, so nothing is retrained)."""
    if width == part.width:
        return part
    w = part.widths
    out = SlicePart(w, part.index, width, part.spec)
    state = dict(part.state_dict())
    state["conv2.weight"] = state["conv2.weight"][:, :w.c1 * width]
    state["fc.weight"] = state["fc.weight"][:, :w.c2 * width * part.geo.pooled_size]
    out.load_state_dict(state)
    return out


def dynamic_width(alive_world_ranks: list[int], width: int) -> int:
    """Width a Dynamic DNN can still run: the longest prefix of slices 0..width-1 still alive
    (slice j lives on world rank j). 0 means slice 0 is gone and nothing can run."""
    alive = set(alive_world_ranks)
    w = 0
    while w < width and w in alive:
        w += 1
    return w
