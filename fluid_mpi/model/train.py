"""Training for the three families. Knows models and data; nothing of MPI.

- Static: plain cross-entropy at full width.
- Dynamic: slimmable training by the sandwich rule -- every step sums the loss of the narrowest width,
  the full width and (for K > 3) two random widths in between; for K <= 3 that is every width.
- Fluid, ``method="joint"`` (the default): every group and every head trained together, each step summing
  the loss of every subset's head on its groups' features (the singles, each group's own head, included),
  so that each group is good alone and every combination is good together; for K > 4, every single, the
  whole set and 16 other subsets drawn per step, then every combined head fitted on the frozen trunks.
  At inference nothing changes: groups share no weights and no features, any subset answers.
- Fluid, ``method="nested"``: the paper's *nested incremental training*. Stage k freezes groups 0..k-1 (and
  their heads) and trains group k with ``CE(head_k(f_k)) + CE(head_{0..k}([f_0..f_k]))``; a last stage
  trains the combined heads of the other subsets on frozen trunks. Later groups come out weaker alone.

The recipe (all families): Adam with a one-cycle learning rate, a small random affine warp of every
training image (``augment.py``), and BatchNorm after each conv for Static and Fluid, folded into the convs
at the end (the trained model has exactly today's layers and cost). Deterministic for a given seed.
docs/models.md gives the measured effect of each part.
"""
from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import augment
from .data import Dataset, spec_for
from .models import FluidCNN, SlicedCNN, Widths, all_subsets, build_model, fold_norms, subset_key


augment_fill = augment.BACKGROUND  # (named apart: inside TrainConfig, ``augment`` is the flag)


@dataclass
class TrainConfig:
    """Settings of one training run (stored in the checkpoint)."""

    family: str
    parts: int = 2
    widths: Widths = field(default_factory=Widths)
    epochs: int = 12  # over the data (per stage for method="nested")
    batch_size: int = 64
    lr: float = 5e-3  # the one-cycle schedule's peak
    seed: int = 0
    limit: int | None = None  # use only the first N training images (fast tests)
    method: str = "joint"  # Fluid: joint | nested
    augment: bool = True
    norm: bool = True  # BatchNorm while training (Static, Fluid), folded into the convs at the end
    # set by train() from the data (not a setting: the checkpoint stores the spec as meta["input"])
    fill: float | torch.Tensor = augment_fill

    def as_dict(self) -> dict:
        return {"family": self.family, "parts": self.parts, "widths": self.widths.as_dict(),
                "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "seed": self.seed,
                "limit": self.limit, "method": self.method, "augment": self.augment, "norm": self.norm}


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, gen: torch.Generator):
    order = torch.randperm(len(y), generator=gen)
    for i in range(0, len(y), batch_size):
        idx = order[i:i + batch_size]
        yield x[idx], y[idx]


def _run_stage(name: str, params, loss_fn, x, y, cfg: TrainConfig, gen, progress: bool,
               epochs: int | None = None) -> float:
    """Optimise ``params`` on ``loss_fn(xb, yb)`` for ``epochs`` (cfg.epochs) epochs; returns the last
    epoch's mean loss."""
    epochs = cfg.epochs if epochs is None else epochs
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    steps = epochs * ((len(y) + cfg.batch_size - 1) // cfg.batch_size)
    # one cycle: a short warm-up to the peak (15 % of the steps), then a cosine decay to nearly zero
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(steps, 1), pct_start=0.15)
    bar = tqdm(total=steps, desc=name, unit="step", disable=not progress, leave=True)
    mean = float("nan")
    for _ in range(epochs):
        total, n = 0.0, 0
        for xb, yb in _batches(x, y, cfg.batch_size, gen):
            if cfg.augment:
                xb = augment.affine(xb, gen, cfg.fill)
            loss = loss_fn(xb, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, n = total + loss.item() * len(yb), n + len(yb)
            bar.update(1)
        mean = total / max(n, 1)
        bar.set_postfix(loss=f"{mean:.4f}")
    bar.close()
    return mean


def _set_trainable(module: torch.nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def train(cfg: TrainConfig, data: Dataset, progress: bool = True,
          on_stage_end=None, arch: str = "paper") -> tuple[torch.nn.Module, dict]:
    """Train a model of ``cfg.family`` with the ``arch`` trunk on ``data``; returns the model and a log
    (losses, seconds). The model's input spec (``model.spec``) comes from ``data``.

    ``on_stage_end(name, model)`` is called after each Fluid stage (tests use it to check that
    frozen groups do not change)."""
    gen = seed_everything(cfg.seed)
    data = data.take(cfg.limit)
    spec = dataclasses.replace(spec_for(data), arch=arch)
    cfg.fill = augment.background(spec)
    x, y = spec.to_tensor(data.images), torch.from_numpy(data.labels)
    model = build_model(cfg.family, cfg.parts, cfg.widths, norm=cfg.norm and cfg.family != "dynamic", spec=spec)
    model.train()
    t0 = time.perf_counter()
    stages: dict[str, float] = {}
    if cfg.family == "static":
        stages["full"] = _run_stage("static", model.parameters(),
                                    lambda xb, yb: F.cross_entropy(model(xb), yb), x, y, cfg, gen, progress)
    elif cfg.family == "dynamic":
        stages["sandwich"] = _run_stage("dynamic", model.parameters(), _sandwich_loss(model, gen),
                                        x, y, cfg, gen, progress)
    elif cfg.method == "joint":
        stages.update(_train_fluid_joint(model, cfg, x, y, gen, progress))
    else:
        stages.update(_train_fluid(model, cfg, x, y, gen, progress, on_stage_end or (lambda n, m: None)))
    model.eval()
    fold_norms(model)
    log = {"stage_losses": stages, "train_seconds": round(time.perf_counter() - t0, 2),
           "train_images": len(y), "data": data.source}
    if data.skipped:  # unreadable files of a folder data set: counted, the first few named
        log.update(skipped=len(data.skipped), skipped_first=data.skipped[:5])
    return model, log


def _sandwich_loss(model: SlicedCNN, gen: torch.Generator):
    k = model.parts

    def loss(xb, yb):
        widths = {1, k}
        if k > 3:  # sandwich rule: narrowest, widest and two random widths in between
            widths |= {int(w) for w in torch.randint(2, k, (2,), generator=gen)}
        return sum(F.cross_entropy(model(xb, w), yb) for w in sorted(widths))

    return loss


# Beyond 4 groups the subsets grow as 2^K (255 at K = 8): each step then trains every single, the whole
# set and this many other subsets drawn at random, and a last stage fits every combined head.
SAMPLED_SUBSETS = 16


def _train_fluid_joint(model: FluidCNN, cfg: TrainConfig, x, y, gen, progress: bool) -> dict:
    every = all_subsets(model.parts)
    sampled = len(every) > 15  # K > 4
    fixed = [s for s in every if len(s) in (1, model.parts)] if sampled else every
    others = [s for s in every if s not in fixed]

    def loss(xb, yb):
        feats = model.features(xb)
        chosen = list(fixed)
        if sampled:
            chosen += [others[int(i)] for i in torch.randperm(len(others), generator=gen)[:SAMPLED_SUBSETS]]
        return sum(F.cross_entropy(model.heads.logits({g: feats[g] for g in s}), yb) for s in chosen)

    losses = {"joint": _run_stage("fluid joint", model.parameters(), loss, x, y, cfg, gen, progress)}
    if sampled:
        losses.update(_fit_heads(model, [s for s in every if len(s) > 1], cfg, x, y, gen, progress,
                                 epochs=max(1, cfg.epochs // 4)))
    return losses


def _fit_heads(model: FluidCNN, subsets: list, cfg: TrainConfig, x, y, gen, progress: bool,
               epochs: int | None = None) -> dict:
    """Train the combined heads of ``subsets`` on the frozen trunks (in eval mode: their statistics stay)."""
    heads = model.heads
    _set_trainable(model, False)
    for s in subsets:
        _set_trainable(heads.head(s), True)
    model.groups.eval()

    def head_loss(xb, yb):
        with torch.no_grad():
            feats = model.features(xb)
        return sum(F.cross_entropy(heads.logits({g: feats[g] for g in s}), yb) for s in subsets)

    loss = _run_stage("fluid subset heads", heads.parameters(), head_loss, x, y, cfg, gen, progress, epochs)
    model.groups.train()
    _set_trainable(model, True)
    return {"subset_heads": loss, "subset_heads_trained": [subset_key(s) for s in subsets]}


def _train_fluid(model: FluidCNN, cfg: TrainConfig, x, y, gen, progress: bool, on_stage_end) -> dict:
    losses = {}
    heads = model.heads
    for k in range(model.parts):
        _set_trainable(model, False)
        trainable = [model.groups[k], heads.single[k]] + ([heads.head(range(k + 1))] if k else [])
        for m in trainable:
            _set_trainable(m, True)
        for g in range(model.parts):  # frozen groups in eval mode: their BatchNorm statistics stay too
            model.groups[g].train(g == k)

        def loss(xb, yb, k=k):
            with torch.no_grad():  # frozen groups: features only
                frozen = [model.groups[g](xb) for g in range(k)]
            fk = model.groups[k](xb)
            out = F.cross_entropy(heads.single[k](fk), yb)
            if k:
                out = out + F.cross_entropy(heads.head(range(k + 1))(torch.cat(frozen + [fk], 1)), yb)
            return out

        params = [p for m in trainable for p in m.parameters()]
        losses[f"group{k}"] = _run_stage(f"fluid stage {k + 1}/{model.parts}", params, loss, x, y, cfg,
                                         gen, progress)
        on_stage_end(f"group{k}", model)
    model.groups.train()
    # subsets that nested training did not cover (non-prefix subsets, K >= 3): heads on frozen trunks
    rest = [s for s in all_subsets(model.parts) if len(s) > 1 and s != tuple(range(len(s)))]
    if rest:
        losses.update(_fit_heads(model, rest, cfg, x, y, gen, progress))
        on_stage_end("subset_heads", model)
    _set_trainable(model, True)
    return losses
