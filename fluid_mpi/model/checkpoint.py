"""Checkpoints: one file for a trained model, and per-rank exports that hold one sub-network each.

A checkpoint is a ``torch.save`` dict ``{"format": "fluid-mpi", "version": 1, "meta": {...},
"state": state_dict}``; ``meta`` has the family, K (``parts``), widths, the input (``"input"``: shape,
classes, normalisation, how pictures are prepared; absent in checkpoints from before, which are MNIST's),
the training settings and the measured accuracies. A part file is ``{"format": "fluid-mpi-part", "version": 1, "meta": {...},
"index": j, "state": part_state}``. Everything is loaded with ``weights_only=True`` (no pickle code).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import CheckpointError
from .models import FAMILIES, Widths, build_model
from .partition import FluidPart, SlicePart, fluid_state, narrow, slice_state
from .spec import InputSpec

FORMAT, PART_FORMAT, VERSION = "fluid-mpi", "fluid-mpi-part", 1


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, meta: dict) -> None:
    """Write the model and its metadata atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, "version": VERSION, "meta": meta, "state": model.state_dict()}, tmp)
    os.replace(tmp, path)


def _load(path: Path, fmt: str, mmap: bool = False) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises many types for truncated/foreign files
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable fluid-mpi checkpoint ({reason})") from None
    if not isinstance(blob, dict) or blob.get("format") != fmt:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise CheckpointError(f"{path}: not a {fmt} file (format: {found!r})")
    if blob.get("version") != VERSION:
        raise CheckpointError(f"{path}: format version {blob.get('version')!r}, this fluid-mpi reads {VERSION}")
    meta = blob.get("meta")
    if not isinstance(meta, dict) or meta.get("family") not in FAMILIES or not isinstance(meta.get("parts"), int):
        raise CheckpointError(f"{path}: checkpoint metadata is missing or inconsistent")
    return blob


def widths_of(meta: dict) -> Widths:
    return Widths(**meta["widths"])


def spec_of(meta: dict) -> InputSpec:
    """The checkpoint's input spec (MNIST's for a checkpoint written before specs existed)."""
    try:
        return InputSpec.from_dict(meta.get("input"))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint input description is inconsistent ({exc})") from None


def load_checkpoint(path: str | os.PathLike) -> tuple[torch.nn.Module, dict]:
    """The whole model (eval mode) and its metadata."""
    blob = _load(Path(path), FORMAT)
    meta = blob["meta"]
    model = build_model(meta["family"], meta["parts"], widths_of(meta), spec=spec_of(meta))
    try:
        model.load_state_dict(blob["state"])
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{path}: weights do not fit a {meta['family']} K={meta['parts']} model "
                              f"({str(exc).splitlines()[0][:100]})") from None
    return model.eval(), meta


def load_meta(path: str | os.PathLike) -> dict:
    """Only the metadata of a checkpoint file or an export directory (tensors are memory-mapped, not read)."""
    path = Path(path)
    if path.is_dir():
        return _load(path / part_name(0), PART_FORMAT, mmap=True)["meta"]
    return _load(path, FORMAT, mmap=True)["meta"]


def part_name(index: int) -> str:
    return f"part-{index}.pt"


def part_state(model: torch.nn.Module, meta: dict, index: int) -> dict:
    if meta["family"] == "fluid":
        return fluid_state(model, index, with_bank=True)
    return slice_state(model, index, meta["parts"])


def export_parts(ckpt: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Write one small file per rank (``part-J.pt``) holding only that rank's sub-network."""
    model, meta = load_checkpoint(ckpt)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for j in range(meta["parts"]):
        path = out_dir / part_name(j)
        torch.save({"format": PART_FORMAT, "version": VERSION, "meta": meta, "index": j,
                    "state": part_state(model, meta, j)}, path)
        paths.append(path)
    return paths


def load_part(source: str | os.PathLike, index: int, width: int | None = None):
    """Load only part ``index``: from an export directory (reads ``part-J.pt`` alone) or from a full
    checkpoint (memory-mapped, so only this part's tensors are read). Returns ``(part, meta)``.

    ``width`` (Dynamic only) narrows the slice to run at a smaller width.
    """
    source = Path(source)
    if source.is_dir():
        blob = _load(source / part_name(index), PART_FORMAT)
        meta, state = blob["meta"], blob["state"]
        if blob.get("index") != index:
            raise CheckpointError(f"{source / part_name(index)}: holds part {blob.get('index')}, not {index}")
    else:
        blob = _load(source, FORMAT, mmap=True)
        meta = blob["meta"]
        with torch.device("meta"):  # no storage: assign= below points at the memory-mapped tensors
            model = build_model(meta["family"], meta["parts"], widths_of(meta), spec=spec_of(meta))
        try:
            model.load_state_dict(blob["state"], assign=True)
        except (RuntimeError, KeyError) as exc:
            raise CheckpointError(f"{source}: weights do not fit the metadata ({str(exc)[:100]})") from None
        if not 0 <= index < meta["parts"]:
            raise CheckpointError(f"{source}: has {meta['parts']} parts, no part {index}")
        state = part_state(model, meta, index)
    if not 0 <= index < meta["parts"]:
        raise CheckpointError(f"{source}: has {meta['parts']} parts, no part {index}")
    w, spec = widths_of(meta), spec_of(meta)
    if meta["family"] == "fluid":
        part = FluidPart(w, index, meta["parts"], with_bank=True, spec=spec)
    else:
        part = SlicePart(w, index, meta["parts"], spec)
    try:
        part.load_state_dict(state)
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{source}: part {index} weights are inconsistent ({str(exc)[:100]})") from None
    if width is not None and meta["family"] != "fluid":
        part = narrow(part, width)
    return part.eval(), meta

