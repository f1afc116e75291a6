"""Accuracy of a trained model: the whole model, every width (Dynamic) or every subset of groups
(Fluid, with both ways of combining), and every sub-network alone."""
from __future__ import annotations

import torch

from .data import Dataset
from .cost import device_cost
from .models import FluidCNN, SlicedCNN, Widths, all_subsets, subset_key
from .spec import InputSpec


@torch.no_grad()
def _accuracy(fn, data: Dataset, spec, batch_size: int = 1000) -> float:
    correct = 0
    for i in range(0, len(data), batch_size):
        x = spec.to_tensor(data.images[i:i + batch_size])
        correct += int((fn(x).argmax(1).numpy() == data.labels[i:i + batch_size]).sum())
    return round(100.0 * correct / max(len(data), 1), 2)


def accuracy_report(model: torch.nn.Module, family: str, data: Dataset) -> dict:
    """``{"full": %, "subsets": {key: %}}`` plus, for Fluid, ``"subsets_avg"`` (log-prob averaging)."""
    model.eval()
    check_shape(model.spec, data)
    if family == "static":
        return {"full": _accuracy(model, data, model.spec)}
    if isinstance(model, SlicedCNN):
        subsets = {str(w): _accuracy(lambda x, w=w: model(x, w), data, model.spec) for w in range(1, model.parts + 1)}
        return {"full": subsets[str(model.parts)], "subsets": subsets}
    assert isinstance(model, FluidCNN)
    # one trunk pass per batch; every subset and both combine rules reuse the features
    keys = [(subset_key(s), s, c) for s in all_subsets(model.parts) for c in ("head", "avg")
            if c == "head" or len(s) > 1]
    correct = dict.fromkeys([(k, c) for k, _, c in keys], 0)
    with torch.no_grad():
        for i in range(0, len(data), 1000):
            feats = model.features(model.spec.to_tensor(data.images[i:i + 1000]))
            labels = torch.from_numpy(data.labels[i:i + 1000])
            for key, s, c in keys:
                pred = model.heads.logits({g: feats[g] for g in s}, c).argmax(1)
                correct[(key, c)] += int((pred == labels).sum())

    def pct(n):
        return round(100.0 * n / max(len(data), 1), 2)

    subsets = {k: pct(correct[(k, "head")]) for k, _, c in keys if c == "head"}
    avg = {k: pct(correct[(k, "avg")]) for k, _, c in keys if c == "avg"}
    return {"full": subsets[subset_key(range(model.parts))], "subsets": subsets, "subsets_avg": avg,
            **subset_summary(subsets, model.parts)}


def check_shape(spec, data: Dataset) -> None:
    """A :class:`DataError` (one line) when ``data`` does not fit a model of ``spec``."""
    from ..errors import DataError

    if tuple(data.images.shape[1:]) != spec.image_shape:
        raise DataError(f"{data.source}: images are {'x'.join(map(str, data.images.shape[1:]))}, the model "
                        f"takes {'x'.join(map(str, spec.image_shape))}")
    if len(data) and int(data.labels.max()) >= spec.num_classes:
        raise DataError(f"{data.source}: label {int(data.labels.max())} but the model has {spec.num_classes} classes")


def subset_summary(subsets: dict[str, float], parts: int) -> dict:
    """From the accuracy of every subset of groups: the mean over the subsets of each size (what a run
    that lost K - n devices can expect, over which ones), and HT's mix (each group's own head answers an
    equal share of the inputs when the devices are equally fast)."""
    by_size: dict[str, list[float]] = {}
    for key, value in subsets.items():
        by_size.setdefault(str(len(key.split("+"))), []).append(value)
    singles = [subsets[str(g)] for g in range(parts)]
    return {"by_size": {n: round(sum(v) / len(v), 2) for n, v in sorted(by_size.items(), key=lambda kv: int(kv[0]))},
            "ht_mix": round(sum(singles) / parts, 2)}


def combine_advice(acc: dict) -> str:
    """Which way of combining groups scored higher on the evaluated images: the trained subset heads (the
    default) or the average of the groups' own heads (``infer --combine avg``). Neither is better for every
    model (measured: the trained heads at the tiny widths, averaging for groups that are good alone at
    K = 8), so the choice is the user's, made on their own held-out images, not on the training set."""
    avg = acc["subsets_avg"]
    whole = max(avg, key=lambda k: len(k.split("+")))
    trained_mean = sum(acc["subsets"][k] for k in avg) / len(avg)
    avg_mean = sum(avg.values()) / len(avg)
    verdict = ("averaging scored higher (pass --combine avg to infer)" if avg_mean > trained_mean
               else "the trained heads scored higher")
    return (f"combining groups, on these images: all groups {acc['subsets'][whole]:.2f} with the trained head, "
            f"{avg[whole]:.2f} averaging their own heads; over every subset of 2 or more groups "
            f"{trained_mean:.2f} against {avg_mean:.2f}: {verdict}")


def format_report(meta: dict, acc: dict) -> str:
    """A readable table of an accuracy report."""
    spec = InputSpec.from_dict(meta.get("input"))
    lines = [f"{meta['family']} model, K={meta['parts']}, widths per part {meta['widths']}",
             f"input {spec.channels}x{spec.height}x{spec.width}, {spec.num_classes} classes, {spec.arch} trunk; "
             f"test data: {meta.get('test_data', '?')}", "",
             f"{'sub-network':<24}{'accuracy %':>12}", "-" * 36,
             f"{'whole model':<24}{acc['full']:>12.2f}"]
    label = "width" if meta["family"] == "dynamic" else "groups"
    for key, value in acc.get("subsets", {}).items():
        extra = ""
        if key in acc.get("subsets_avg", {}):
            extra = f"   (avg of heads: {acc['subsets_avg'][key]:.2f})"
        lines.append(f"{label + ' ' + key:<24}{value:>12.2f}{extra}")
    if acc.get("subsets_avg"):
        lines += ["", combine_advice(acc)]
    if "by_size" in acc:
        lines += ["", "mean over subsets of each size: " + ", ".join(f"{n} group(s) {v:.2f}"
                                                                  for n, v in acc["by_size"].items()),
                  f"HT mix (each group's own head, equal shares): {acc['ht_mix']:.2f}"]
    w = meta.get("widths")
    if isinstance(w, dict):
        cost = device_cost(meta["family"], Widths(**w), meta["parts"], spec)
        lines.append(f"per device: {cost['macs']:,} multiply-adds per image, {cost['params']:,} parameters")
    skipped = meta.get("log", {}).get("skipped")
    if skipped:
        lines.append(f"unreadable training files skipped: {skipped} (first: {'; '.join(meta['log']['skipped_first'])})")
    return "\n".join(lines)
