"""The one training recipe every caller uses (``fluid-mpi train``, the benchmark, the test fixtures):
train, measure the accuracy of every width/subset on the test split, build the checkpoint metadata,
save. Keeping it in one place keeps the metadata the same wherever a checkpoint comes from."""
from __future__ import annotations

import os

import torch

from .checkpoint import save_checkpoint
from .data import Dataset
from .spec import InputSpec
from .evaluate import accuracy_report
from .train import TrainConfig, train


def checkpoint_meta(cfg: TrainConfig, log: dict, accuracy: dict, test_ds: Dataset, spec: InputSpec) -> dict:
    """The metadata stored with a trained model (``checkpoint.load_meta`` reads it back)."""
    return {"family": cfg.family, "parts": cfg.parts, "widths": cfg.widths.as_dict(), "train": cfg.as_dict(),
            "log": log, "accuracy": accuracy, "test_data": test_ds.source, "input": spec.as_dict()}


def train_and_save(cfg: TrainConfig, train_ds: Dataset, test_ds: Dataset, out: str | os.PathLike,
                   progress: bool = False, extra: dict | None = None,
                   arch: str = "paper") -> tuple[torch.nn.Module, dict]:
    """Train ``cfg`` on ``train_ds``, evaluate on ``test_ds``, write the checkpoint ``out`` (atomically);
    returns the model (eval mode) and its metadata (``extra``: more keys for it, e.g. the test fraction;
    ``arch``: the trunk, see ``spec.ARCHS``)."""
    model, log = train(cfg, train_ds, progress=progress, arch=arch)
    meta = checkpoint_meta(cfg, log, accuracy_report(model, cfg.family, test_ds), test_ds, model.spec)
    meta.update(extra or {})
    save_checkpoint(out, model, meta)
    return model.eval(), meta
