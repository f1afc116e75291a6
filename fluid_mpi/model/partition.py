"""Sub-network partitioning: the piece of each model family that one device (one MPI rank) holds,
and the partitioned forward in plain torch, against which the MPI runtime is checked.

- :class:`SlicePart` (Static, Dynamic): part j of width k holds output-channel slice j of every layer and
  slice j of the classifier's input columns. A forward is one stage per conv, then the fc stage; between
  stages the parts' outputs are concatenated along channels (an allgather on a cluster); the last stage's
  outputs are partial logits that are summed (a reduce). Part 0 alone carries the classifier bias.
- :class:`FluidPart`: part j is group j's trunk and its independent head. The coordinator also holds the
  :class:`~fluid_mpi.models.HeadBank` to classify from any subset of groups' features.

Parts take and return tensors; the runtime decides how tensors travel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .models import FluidCNN, HeadBank, SlicedCNN, Trunk, Widths, conv_channels, fit_pool, relu_pool
from .spec import MNIST, InputSpec, geometry

class SlicePart(nn.Module):
    """Part ``index`` of a :class:`SlicedCNN` running at ``width`` slices (index < width)."""

    def __init__(self, widths: Widths, index: int, width: int, spec: InputSpec = MNIST):
        super().__init__()
        if not 0 <= index < width:
            raise ValueError(f"part index {index} outside width {width}")
        self.widths, self.index, self.width, self.spec = widths, index, width, spec
        self.geo = g = geometry(spec)
        self.chans = conv_channels(widths, g.n_convs)
        ins = [spec.channels] + [c * width for c in self.chans[:-1]]  # every slice's channels come in
        for i, (c_in, c_out) in enumerate(zip(ins, self.chans), 1):
            setattr(self, f"conv{i}", nn.Conv2d(c_in, c_out, g.kernel, padding=g.pad))
        self.fc = nn.Linear(self.chans[-1] * width * g.pooled_size, widths.hidden)
        self.cls_weight = nn.Parameter(torch.zeros(spec.num_classes, widths.hidden))
        # only part 0 adds the bias, so that the sum of partial logits counts it once
        self.cls_bias = nn.Parameter(torch.zeros(spec.num_classes))

    @property
    def n_stages(self) -> int:
        """One stage per conv, then fc with the partial logits."""
        return self.geo.n_convs + 1

    @classmethod
    def from_model(cls, model: SlicedCNN, index: int, width: int | None = None) -> "SlicePart":
        width = model.parts if width is None else width
        part = cls(model.widths, index, width, model.spec)
        part.load_state_dict(slice_state(model, index, width))
        return part

    def stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Run stage ``i`` on the full (gathered) input of that stage; returns this part's share."""
        n = self.geo.n_convs
        if 0 <= i < n:
            y = relu_pool(getattr(self, f"conv{i + 1}")(x))
            # the last conv's stage pools its own channels: the gathered maps are what fc reads
            return fit_pool(y, self.geo.pooled) if i == n - 1 else y
        if i == n:
            return F.linear(F.relu(self.fc(x.flatten(1))), self.cls_weight, self.cls_bias)
        raise IndexError(i)

    def stage_shape(self, i: int, n: int) -> tuple[int, ...]:
        """The shape of this part's share of stage ``i``'s output for a batch of ``n``."""
        g = self.geo
        if i == g.n_convs:
            return (n, self.spec.num_classes)
        return (n, self.chans[i], *(g.pooled if i == g.n_convs - 1 else g.stages[i]))


def slice_state(model: SlicedCNN, index: int, width: int) -> dict[str, torch.Tensor]:
    """The weights part ``index`` needs at ``width`` (copies, so the full model can be freed)."""
    w = model.widths
    full = model.sliced_weights(width)

    def rows(t, n):
        return t[index * n:(index + 1) * n].detach().clone()

    state = {}
    for i, c in enumerate(conv_channels(w, model.trunk.geo.n_convs), 1):
        state[f"conv{i}.weight"], state[f"conv{i}.bias"] = rows(full[f"conv{i}.weight"], c), rows(full[f"conv{i}.bias"], c)
    state.update({
        "fc.weight": rows(full["fc.weight"], w.hidden), "fc.bias": rows(full["fc.bias"], w.hidden),
        "cls_weight": full["classifier.weight"][:, index * w.hidden:(index + 1) * w.hidden].detach().clone(),
        "cls_bias": full["classifier.bias"].detach().clone() if index == 0
        else torch.zeros_like(full["classifier.bias"]),
    })
    return state


def sliced_forward(parts: list[SlicePart], x: torch.Tensor) -> torch.Tensor:
    """The distributed Static/Dynamic forward simulated in one process (allgather = concatenation)."""
    shared, last = x, parts[0].n_stages - 1
    for i in range(last + 1):
        outs = [p.stage(i, shared) for p in parts]
        shared = torch.cat(outs, dim=1) if i < last else torch.stack(outs).sum(0)
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
    out = SlicePart(part.widths, part.index, width, part.spec)
    state = dict(part.state_dict())
    for i in range(2, part.geo.n_convs + 1):
        state[f"conv{i}.weight"] = state[f"conv{i}.weight"][:, :part.chans[i - 2] * width]
    state["fc.weight"] = state["fc.weight"][:, :part.chans[-1] * width * part.geo.pooled_size]
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
