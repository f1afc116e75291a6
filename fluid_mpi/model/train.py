"""Training for the three families. Knows models and data; nothing of MPI.

- Static: plain cross-entropy at full width.
- Dynamic: slimmable training by the sandwich rule -- every step sums the loss of the narrowest width,
  the full width and (for K > 3) two random widths in between; for K <= 3 that is every width.
- Fluid: *nested incremental training*. Stage k (k = 0..K-1) freezes groups 0..k-1 (and their heads) and
  trains group k with ``CE(head_k(f_k)) + CE(head_{0..k}([f_0..f_k]))``. A last stage trains the combined
  heads of the remaining subsets (those that are not a prefix 0..k) on frozen trunks.

All stages use Adam with a cosine learning-rate decay; runs are deterministic for a given seed.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import Dataset, to_tensor_batch
from .models import FluidCNN, SlicedCNN, Widths, all_subsets, build_model, subset_key


@dataclass
class TrainConfig:
    """Settings of one training run (stored in the checkpoint)."""

    family: str
    parts: int = 2
    widths: Widths = field(default_factory=Widths)
    epochs: int = 3
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    limit: int | None = None  # use only the first N training images (fast tests)

    def as_dict(self) -> dict:
        return {"family": self.family, "parts": self.parts, "widths": self.widths.as_dict(),
                "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "seed": self.seed,
                "limit": self.limit}


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


def _run_stage(name: str, params, loss_fn, x, y, cfg: TrainConfig, gen, progress: bool) -> float:
    """Optimise ``params`` on ``loss_fn(xb, yb)`` for cfg.epochs epochs; returns the last epoch's mean loss."""
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    steps = cfg.epochs * ((len(y) + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    bar = tqdm(total=steps, desc=name, unit="step", disable=not progress, leave=True)
    mean = float("nan")
    for _ in range(cfg.epochs):
        total, n = 0.0, 0
        for xb, yb in _batches(x, y, cfg.batch_size, gen):
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
          on_stage_end=None) -> tuple[torch.nn.Module, dict]:
    """Train a model of ``cfg.family`` on ``data``; returns the model and a log (losses, seconds).

    ``on_stage_end(name, model)`` is called after each Fluid stage (tests use it to check that
    frozen groups do not change)."""
    gen = seed_everything(cfg.seed)
    data = data.take(cfg.limit)
    x, y = to_tensor_batch(data.images), torch.from_numpy(data.labels)
    model = build_model(cfg.family, cfg.parts, cfg.widths)
    model.train()
    t0 = time.perf_counter()
    stages: dict[str, float] = {}
    if cfg.family == "static":
        stages["full"] = _run_stage("static", model.parameters(),
                                    lambda xb, yb: F.cross_entropy(model(xb), yb), x, y, cfg, gen, progress)
    elif cfg.family == "dynamic":
        stages["sandwich"] = _run_stage("dynamic", model.parameters(), _sandwich_loss(model, gen),
                                        x, y, cfg, gen, progress)
    else:
        stages.update(_train_fluid(model, cfg, x, y, gen, progress, on_stage_end or (lambda n, m: None)))
    model.eval()
    return model, {"stage_losses": stages, "train_seconds": round(time.perf_counter() - t0, 2),
                   "train_images": len(y), "data": data.source}


def _sandwich_loss(model: SlicedCNN, gen: torch.Generator):
    k = model.parts

    def loss(xb, yb):
        widths = {1, k}
        if k > 3:  # sandwich rule: narrowest, widest and two random widths in between
            widths |= {int(w) for w in torch.randint(2, k, (2,), generator=gen)}
        return sum(F.cross_entropy(model(xb, w), yb) for w in sorted(widths))

    return loss


def _train_fluid(model: FluidCNN, cfg: TrainConfig, x, y, gen, progress: bool, on_stage_end) -> dict:
    losses = {}
    heads = model.heads
    for k in range(model.parts):
        _set_trainable(model, False)
        trainable = [model.groups[k], heads.single[k]] + ([heads.head(range(k + 1))] if k else [])
        for m in trainable:
            _set_trainable(m, True)

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
    # subsets that nested training did not cover (non-prefix subsets, K >= 3): heads on frozen trunks
    rest = [s for s in all_subsets(model.parts) if len(s) > 1 and s != tuple(range(len(s)))]
    if rest:
        _set_trainable(model, False)
        for s in rest:
            _set_trainable(heads.head(s), True)

        def head_loss(xb, yb):
            with torch.no_grad():
                feats = model.features(xb)
            return sum(F.cross_entropy(heads.logits({g: feats[g] for g in s}), yb) for s in rest)

        losses["subset_heads"] = _run_stage("fluid subset heads", heads.parameters(), head_loss, x, y, cfg,
                                            gen, progress)
        losses["subset_heads_trained"] = [subset_key(s) for s in rest]
        on_stage_end("subset_heads", model)
    _set_trainable(model, True)
    return losses
