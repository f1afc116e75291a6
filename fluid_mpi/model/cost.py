"""What one device computes and holds: multiply-adds per image and parameters, per family, for the
per-device widths of a preset or given by hand. Fluid's comparison with Static and Dynamic is at a stated
cost: a Static slice reads every input channel in conv2 and fc, a Fluid group only its own.

Counted from the layer shapes of ``models.py`` (on MNIST: conv1 on 28×28 → 24×24, pool, conv2 → 8×8,
pool, fc on the 4×4 maps; other inputs: ``spec.geometry``); tests/test_cost.py checks the counts against
the real modules."""
from __future__ import annotations

from .models import Widths, conv_channels
from .spec import MNIST, InputSpec, geometry

# Per-device widths (conv1, conv2, hidden) by name. tiny and small are sized for Pi-class devices (the
# paper's edge boards); default is the paper-sized CNN, where one group alone already saturates MNIST.
PRESETS = {"tiny": Widths(2, 4, 8), "small": Widths(4, 8, 16), "default": Widths(16, 32, 64)}


def parse_widths(text: str) -> Widths:
    """A preset name (``tiny``, ``small``, ``default``) or ``C1,C2,H``; ValueError otherwise."""
    if text in PRESETS:
        return PRESETS[text]
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"expected {', '.join(PRESETS)} or three positive integers C1,C2,H, not {text!r}")
    return Widths(*values)


def _layers(w: Widths, k_in: int, spec: InputSpec) -> tuple[int, int]:
    """(MACs, parameters) of one slice's or group's convs and fc, each layer after the first reading
    ``k_in`` slices' channels (1: a Fluid group; K: a Static slice). The average pooling of large maps is
    not counted: it multiplies by no weight."""
    g = geometry(spec)
    chans = conv_channels(w, g.n_convs)
    ins = [spec.channels] + [c * k_in for c in chans[:-1]]
    kernel = g.kernel * g.kernel
    macs = sum(h * wd * c_out * c_in * kernel for (h, wd), c_in, c_out in zip(g.convs, ins, chans))
    params = sum(c_out * c_in * kernel + c_out for c_in, c_out in zip(ins, chans))
    fc_in = chans[-1] * k_in * g.pooled_size
    return macs + fc_in * w.hidden, params + fc_in * w.hidden + w.hidden


def device_cost(family: str, w: Widths, parts: int, spec: InputSpec = MNIST) -> dict[str, int]:
    """MACs per image and parameters on ONE device of a K-device run. Fluid: a group and its own head (what
    a device runs in HT; HA's combined head runs on the coordinator). Static and Dynamic at full width: a
    slice, which reads all K slices' channels in conv2 and fc, and its share of the classifier. ``whole``
    families: the entire model on one device (what replication puts on every device)."""
    n = spec.num_classes
    if family in ("fluid", "static", "dynamic"):
        macs, params = _layers(w, 1 if family == "fluid" else parts, spec)  # a slice reads every slice's
        return {"macs": macs + w.hidden * n, "params": params + w.hidden * n + n}
    if family == "fluid-whole":
        one = device_cost("fluid", w, parts, spec)
        return {"macs": parts * one["macs"], "params": parts * one["params"]}
    if family == "static-whole":
        return device_cost("static", w.scaled(parts), 1, spec)
    raise ValueError(f"unknown family {family!r}")
