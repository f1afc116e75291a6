"""The three model families, all of them in this file: Static, Dynamic (slimmable) and Fluid.

One trunk shape serves all three: ``conv5x5(C->C1) -> ReLU -> maxpool2 -> conv5x5(C1->C2) -> ReLU ->
maxpool2 -> fc(C2*4*4 -> H) -> ReLU``, then a classifier ``fc(H -> classes)``; other input sizes than
MNIST's 1 × 28 × 28 pad the convs or pool the last maps to at most 4 × 4 (``spec.geometry``). Width is split into K equal
slices (K = number of parts = number of MPI ranks); :class:`Widths` holds the width of ONE slice.

- Static  = :class:`SlicedCNN` trained at full width K only.
- Dynamic = :class:`SlicedCNN` trained at every width k = 1..K; width k uses the first k slices of every
  layer, so the narrow network's weights are part of the wide one (that is why losing slice 0 kills it).
- Fluid   = :class:`FluidCNN`: K complete small trunks with no connection between them (a group
  convolution all the way to the features), an independent head per group and a combined head for every
  subset of two or more groups, so any set of surviving groups can classify.

Modules here take and return tensors; they know nothing of ranks or MPI (see ``partition.py``).
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .spec import MNIST, InputSpec, geometry

FAMILIES = ("static", "dynamic", "fluid")


def fit_pool(x: torch.Tensor, pooled: tuple[int, int]) -> torch.Tensor:
    """Average-pool the last maps to ``pooled`` when they are larger (inputs over 28 × 28); MNIST's maps
    are 4 × 4 already and pass untouched."""
    return x if tuple(x.shape[-2:]) == tuple(pooled) else F.adaptive_avg_pool2d(x, pooled)


def relu_pool(x: torch.Tensor) -> torch.Tensor:
    """``max_pool2d(relu(x), 2)``, bit for bit. Without autograd it pools first (ReLU is monotone, so
    ``relu(max) == max(relu)`` exactly) and pools with two element-wise maxima of strided views: one torch
    thread here ran ``F.max_pool2d`` on a (64, 16, 24, 24) batch in 6.8 ms and the maxima in 0.4 ms, so a
    sub-network's batch-64 forward went from 7.4 to 4.6 ms. Training keeps ``F.max_pool2d`` (its gradient)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return F.max_pool2d(F.relu(x), 2)
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2  # floor, as max_pool2d drops an odd last row/column
    rows = torch.maximum(x[..., 0:h:2, :w], x[..., 1:h:2, :w])
    return torch.maximum(rows[..., 0::2], rows[..., 1::2]).relu_()


@dataclass(frozen=True)
class Widths:
    """Channels of one slice (one part): conv1, conv2 and the hidden fc layer."""

    c1: int = 16
    c2: int = 32
    hidden: int = 64

    def scaled(self, k: int) -> "Widths":
        """The widths of k slices side by side."""
        return Widths(self.c1 * k, self.c2 * k, self.hidden * k)

    def as_dict(self) -> dict:
        return asdict(self)


def conv_channels(w: Widths, n_convs: int) -> list[int]:
    """Output channels of each conv of a trunk of ``n_convs`` convs: conv1, conv2, then conv2's again."""
    return [w.c1, w.c2] + [w.c2] * (n_convs - 2)


class Trunk(nn.Module):
    """conv-pool stages then fc: the feature extractor; returns the hidden features (B, H). Its layers are
    ``conv1``, ``conv2`` (and ``conv3`` for the cnn3 trunk) and ``fc``; shapes from ``spec.geometry``.

    ``norm=True`` (training only) puts a BatchNorm after each conv; :meth:`fold_norm` then folds it into the
    conv's weights and bias, so the trained trunk is the plain one: same layers, same cost at inference."""

    def __init__(self, w: Widths, norm: bool = False, spec: InputSpec = MNIST):
        super().__init__()
        self.geo = g = geometry(spec)
        chans = conv_channels(w, g.n_convs)
        for i, (c_in, c_out) in enumerate(zip([spec.channels] + chans[:-1], chans), 1):
            setattr(self, f"conv{i}", nn.Conv2d(c_in, c_out, g.kernel, padding=g.pad))
        self.fc = nn.Linear(chans[-1] * g.pooled_size, w.hidden)
        self.norms = nn.ModuleList([nn.BatchNorm2d(c) for c in chans]) if norm else None

    def convs(self) -> list[nn.Conv2d]:
        return [getattr(self, f"conv{i}") for i in range(1, self.geo.n_convs + 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs()):
            x = conv(x)
            x = relu_pool(self.norms[i](x) if self.norms is not None else x)
        return F.relu(self.fc(fit_pool(x, self.geo.pooled).flatten(1)))

    @torch.no_grad()
    def fold_norm(self) -> None:
        """Fold each BatchNorm (its running statistics: inference behaviour) into the conv before it and
        drop it: ``bn(conv(x)) = a * conv(x) + b`` per channel, so conv's weight becomes ``a * W`` and its
        bias ``a * bias + b``."""
        if self.norms is None:
            return
        for conv, bn in zip(self.convs(), self.norms):
            a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv.weight.mul_(a.view(-1, 1, 1, 1))
            conv.bias.copy_(a * (conv.bias - bn.running_mean) + bn.bias)
        self.norms = None


class SlicedCNN(nn.Module):
    """A full-width CNN of K slices that can also run at width k < K on its first k slices.

    Static uses only ``width=K``; Dynamic (slimmable) trains and runs every width.
    """

    def __init__(self, parts: int, widths: Widths = Widths(), norm: bool = False, spec: InputSpec = MNIST):
        super().__init__()
        self.parts, self.widths, self.spec = parts, widths, spec
        self.trunk = Trunk(widths.scaled(parts), norm, spec)
        self.classifier = nn.Linear(widths.hidden * parts, spec.num_classes)

    def sliced_weights(self, width: int) -> dict[str, torch.Tensor]:
        """The weights of the first ``width`` slices (views, so gradients flow to the shared weights)."""
        t, h = self.trunk, self.widths.hidden * width
        p, prev = {}, None
        for i, (conv, c) in enumerate(zip(t.convs(), conv_channels(self.widths, t.geo.n_convs)), 1):
            c *= width  # the first c output channels, reading the previous conv's first channels
            p[f"conv{i}.weight"] = conv.weight[:c] if prev is None else conv.weight[:c, :prev]
            p[f"conv{i}.bias"] = conv.bias[:c]
            prev = c
        # flatten is channel-major, so the first channels are the first channels * pooled columns
        p.update({"fc.weight": t.fc.weight[:h, :prev * t.geo.pooled_size], "fc.bias": t.fc.bias[:h],
                  "classifier.weight": self.classifier.weight[:, :h], "classifier.bias": self.classifier.bias})
        return p

    def forward(self, x: torch.Tensor, width: int | None = None) -> torch.Tensor:
        width = self.parts if width is None else width
        if not 1 <= width <= self.parts:
            raise ValueError(f"width must be 1..{self.parts}, not {width}")
        p, norms, geo = self.sliced_weights(width), self.trunk.norms, self.trunk.geo
        if norms is not None and width != self.parts:
            raise ValueError("a trunk with BatchNorm runs at full width only (Static training); fold it first")
        for i in range(geo.n_convs):
            x = F.conv2d(x, p[f"conv{i + 1}.weight"], p[f"conv{i + 1}.bias"], padding=geo.pad)
            x = relu_pool(norms[i](x) if norms is not None else x)
        x = F.relu(F.linear(fit_pool(x, geo.pooled).flatten(1), p["fc.weight"], p["fc.bias"]))
        return F.linear(x, p["classifier.weight"], p["classifier.bias"])


def subset_key(subset) -> str:
    """Canonical name of a set of groups/ranks: sorted indices joined by '+', e.g. ``"0+2"``."""
    return "+".join(str(i) for i in sorted(subset))


def all_subsets(parts: int) -> list[tuple[int, ...]]:
    """Every non-empty subset of ``range(parts)``, smallest first."""
    return [s for r in range(1, parts + 1) for s in itertools.combinations(range(parts), r)]


class HeadBank(nn.Module):
    """Every head of a Fluid model: one independent head per group and one combined head per subset of
    two or more groups (input: the subset's features concatenated in group order)."""

    def __init__(self, parts: int, hidden: int, classes: int = 10):
        super().__init__()
        self.parts = parts
        self.single = nn.ModuleList(nn.Linear(hidden, classes) for _ in range(parts))
        self.combined = nn.ModuleDict({subset_key(s): nn.Linear(hidden * len(s), classes)
                                       for s in all_subsets(parts) if len(s) > 1})

    def head(self, subset) -> nn.Linear:
        """The head trained for exactly this subset."""
        subset = tuple(sorted(subset))
        return self.single[subset[0]] if len(subset) == 1 else self.combined[subset_key(subset)]

    def logits(self, feats: dict[int, torch.Tensor], combine: str = "head") -> torch.Tensor:
        """Classify from the features of the groups present in ``feats`` (group index -> (B, H)).

        ``combine="head"`` uses the subset's own combined head; ``"avg"`` averages the independent
        heads' log-probabilities (returned as logits of that average, so argmax/softmax still apply).
        """
        subset = sorted(feats)
        if not subset:
            raise ValueError("no group features to classify")
        if combine == "head" or len(subset) == 1:
            return self.head(subset)(torch.cat([feats[g] for g in subset], dim=1))
        if combine != "avg":
            raise ValueError(f"combine must be 'head' or 'avg', not {combine!r}")
        logp = [F.log_softmax(self.single[g](feats[g]), dim=1) for g in subset]
        return torch.stack(logp).mean(0)


class FluidCNN(nn.Module):
    """K independent trunks (groups) plus a :class:`HeadBank`."""

    def __init__(self, parts: int, widths: Widths = Widths(), norm: bool = False, spec: InputSpec = MNIST):
        super().__init__()
        self.parts, self.widths, self.spec = parts, widths, spec
        self.groups = nn.ModuleList(Trunk(widths, norm, spec) for _ in range(parts))
        self.heads = HeadBank(parts, widths.hidden, spec.num_classes)

    def features(self, x: torch.Tensor, subset=None) -> dict[int, torch.Tensor]:
        subset = range(self.parts) if subset is None else subset
        return {g: self.groups[g](x) for g in subset}

    def forward(self, x: torch.Tensor, subset=None, combine: str = "head") -> torch.Tensor:
        return self.heads.logits(self.features(x, subset), combine)


def build_model(family: str, parts: int, widths: Widths = Widths(), norm: bool = False,
                spec: InputSpec = MNIST) -> nn.Module:
    """A fresh model of the given family with ``parts`` slices/groups for ``spec``'s inputs and classes
    (``norm``: BatchNorm for training, folded away by :func:`fold_norms`; not for Dynamic, whose widths
    share the convs)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, not {family!r}")
    if parts < 1:
        raise ValueError("parts must be >= 1")
    if norm and family == "dynamic":
        raise ValueError("Dynamic trains without BatchNorm: its widths share the convs, not their statistics")
    return FluidCNN(parts, widths, norm, spec) if family == "fluid" else SlicedCNN(parts, widths, norm, spec)


def fold_norms(model: nn.Module) -> nn.Module:
    """Fold every trunk's BatchNorm into its convs (see :meth:`Trunk.fold_norm`); returns the model."""
    for m in model.modules():
        if isinstance(m, Trunk):
            m.fold_norm()
    return model
