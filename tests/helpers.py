"""Reference predictions computed in-process, to compare distributed runs against."""
from __future__ import annotations

import numpy as np
import torch

from fluid_mpi.model import checkpoint
from fluid_mpi.model.data import load_split, to_tensor_batch


def reference_logits(ckpt, limit: int, subset=None, width=None) -> np.ndarray:
    """In-process logits of the first ``limit`` embedded test images: the whole model, a Fluid subset
    (HA head of that subset) or a Dynamic width."""
    model, meta = checkpoint.load_checkpoint(ckpt)
    x = to_tensor_batch(load_split(None, "test").take(limit).images)
    with torch.no_grad():
        if meta["family"] == "fluid":
            return model(x, subset).numpy()
        return model(x, width).numpy()


def check_against(preds: list[dict], ref_for) -> None:
    """Every prediction's logits equal ``ref_for(pred)`` (allclose) and the argmax agrees."""
    for p in preds:
        want = ref_for(p)
        got = np.array(p["logits"], dtype=np.float32)
        assert np.allclose(got, want, atol=1e-4), (p["index"], got, want)
        assert p["pred"] == int(np.argmax(want))
