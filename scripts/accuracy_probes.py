"""Training probes behind docs/models.md's "what helped and what did not": training methods for Fluid
(independent width groups) on MNIST, each on its own, outside the product's training code (so one knob can
be turned at a time). The product's recipe (fluid_mpi/model/train.py) is the one these probes chose.

Usage: OMP_NUM_THREADS=1 python scripts/accuracy_probes.py --method joint --parts 2 --widths 2,4,8 ...
Prints one JSON line (also appended to --log).

Methods
- static : one full-width trunk (widths * K) + linear classifier  (today's Static, same recipe options)
- nested : today's nested incremental training (re-implemented, same as fluid_mpi.model.train)
- joint  : all groups trained together, nothing frozen; loss = sum over ALL non-empty subsets S of
           CE(head_S(cat f_S)) (singles included), + optional in-place KD from the full combined head
           into every other subset's head; optional final head fit of combined heads on frozen trunks.
Recipe options (apply to any method): --aug shift|affine, --ls label smoothing, --sched cos|onecycle,
--lr, --epochs, --bn (BatchNorm after each conv in the trunk; foldable at inference), --hh (hidden width
of combined heads; 0 = linear).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(1)

from fluid_mpi.model.data import MNIST_MEAN, MNIST_STD, load_split, to_tensor_batch  # noqa: E402

POOLED = 16
BG = (0.0 - MNIST_MEAN) / MNIST_STD  # normalised background value


def subsets(K):
    return [s for r in range(1, K + 1) for s in itertools.combinations(range(K), r)]


def key(s):
    return "+".join(map(str, s))


class Trunk(nn.Module):
    def __init__(self, c1, c2, h, bn=False):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 5)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.fc = nn.Linear(c2 * POOLED, h)
        self.bn = bn
        if bn:
            self.bn1, self.bn2 = nn.BatchNorm2d(c1), nn.BatchNorm2d(c2)

    def forward(self, x):
        x = self.conv1(x)
        if self.bn:
            x = self.bn1(x)
        x = F.max_pool2d(F.relu(x), 2)
        x = self.conv2(x)
        if self.bn:
            x = self.bn2(x)
        x = F.max_pool2d(F.relu(x), 2)
        return F.relu(self.fc(x.flatten(1)))


def make_head(inp, hh):
    if hh <= 0:
        return nn.Linear(inp, 10)
    return nn.Sequential(nn.Linear(inp, hh), nn.ReLU(), nn.Linear(hh, 10))


class Fluid(nn.Module):
    def __init__(self, K, w, bn=False, hh=0):
        super().__init__()
        self.K = K
        self.groups = nn.ModuleList(Trunk(*w, bn=bn) for _ in range(K))
        self.heads = nn.ModuleDict({key(s): (nn.Linear(w[2], 10) if len(s) == 1 else make_head(w[2] * len(s), hh))
                                    for s in subsets(K)})

    def head(self, s, feats):
        return self.heads[key(s)](torch.cat([feats[g] for g in s], 1))


def augment(x, mode, gen, strength=1.0):
    """x: normalised (B,1,28,28). Returns augmented copy, deterministic for gen."""
    if mode == "none":
        return x
    B = x.shape[0]
    u = torch.rand(B, 5, generator=gen) * 2 - 1  # in [-1,1]
    tx, ty = u[:, 0] * 2.0 * strength, u[:, 1] * 2.0 * strength  # pixels
    if mode == "shift":
        ang = torch.zeros(B)
        sc = torch.ones(B)
    else:  # affine: rotation +-10 deg, scale +-10 %, translation +-2 px
        ang = u[:, 2] * math.radians(10) * strength
        sc = 1 + u[:, 3] * 0.1 * strength
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    theta[:, 0, 2], theta[:, 1, 2] = -tx * 2 / 28, -ty * 2 / 28
    grid = F.affine_grid(theta, (B, 1, 28, 28), align_corners=False)
    return F.grid_sample(x - BG, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + BG


def run_opt(params, loss_fn, x, y, a, gen, epochs=None):
    epochs = a.epochs if epochs is None else epochs
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.Adam(params, lr=a.lr, weight_decay=a.wd)
    spe = (len(y) + a.bs - 1) // a.bs
    steps = epochs * spe
    if a.sched == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=steps, pct_start=0.15)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), a.bs):
            idx = order[i:i + a.bs]
            xb = augment(x[idx], a.aug, gen, a.aug_strength)
            loss = loss_fn(xb, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


def ce(logits, y, ls):
    return F.cross_entropy(logits, y, label_smoothing=ls)


def kd(student, teacher, T):
    return F.kl_div(F.log_softmax(student / T, 1), F.softmax(teacher.detach() / T, 1), reduction="batchmean") * T * T


def set_tr(m, flag):
    for p in m.parameters():
        p.requires_grad_(flag)


def train(a, x, y, gen):
    K, w = a.parts, a.widths
    if a.method == "static":
        model = Fluid(1, [v * K for v in w], bn=a.bn)
        run_opt(model.parameters(), lambda xb, yb: ce(model.heads["0"](model.groups[0](xb)), yb, a.ls), x, y, a, gen)
        return model
    model = Fluid(K, w, bn=a.bn, hh=a.hh)
    S = subsets(K)
    if a.method == "nested":
        for k in range(K):
            set_tr(model, False)
            tr = [model.groups[k], model.heads[key((k,))]] + ([model.heads[key(tuple(range(k + 1)))]] if k else [])
            for m in tr:
                set_tr(m, True)
            for g in range(k):
                model.groups[g].eval()  # frozen BN stats

            def loss(xb, yb, k=k):
                with torch.no_grad():
                    fr = {g: model.groups[g](xb) for g in range(k)}
                fr[k] = model.groups[k](xb)
                out = ce(model.head((k,), fr), yb, a.ls)
                if k:
                    out = out + ce(model.head(tuple(range(k + 1)), fr), yb, a.ls)
                return out
            run_opt([p for m in tr for p in m.parameters()], loss, x, y, a, gen)
        rest = [s for s in S if len(s) > 1 and s != tuple(range(len(s)))]
        if rest:
            head_fit(model, rest, a, x, y, gen, a.epochs)
        set_tr(model, True)
        return model
    # joint
    full = tuple(range(K))

    def loss(xb, yb):
        feats = {g: model.groups[g](xb) for g in range(K)}
        logits = {s: model.head(s, feats) for s in S}
        out = 0.0
        for s in S:
            wgt = a.w_single if len(s) == 1 else 1.0
            out = out + wgt * ce(logits[s], yb, a.ls)
            if a.kd > 0 and s != full:
                out = out + a.kd * kd(logits[s], logits[full], a.T)
        return out
    run_opt(model.parameters(), loss, x, y, a, gen)
    if a.headfit > 0:
        head_fit(model, [s for s in S if len(s) > 1], a, x, y, gen, a.headfit)
    set_tr(model, True)
    return model


def head_fit(model, rest, a, x, y, gen, epochs):
    set_tr(model, False)
    model.groups.eval()
    for s in rest:
        set_tr(model.heads[key(s)], True)

    def hl(xb, yb):
        with torch.no_grad():
            feats = {g: model.groups[g](xb) for g in range(model.K)}
        return sum(ce(model.head(s, feats), yb, a.ls) for s in rest)
    run_opt([p for s in rest for p in model.heads[key(s)].parameters()], hl, x, y, a, gen, epochs)


@torch.no_grad()
def evaluate(model, xt, yt):
    model.eval()
    K = model.K
    S = subsets(K)
    correct = {key(s): 0 for s in S}
    avgc = {key(s): 0 for s in S if len(s) > 1}
    for i in range(0, len(yt), 1000):
        xb, yb = xt[i:i + 1000], yt[i:i + 1000]
        feats = {g: model.groups[g](xb) for g in range(K)}
        for s in S:
            correct[key(s)] += int((model.head(s, feats).argmax(1) == yb).sum())
            if len(s) > 1:
                lp = torch.stack([F.log_softmax(model.heads[key((g,))](feats[g]), 1) for g in s]).mean(0)
                avgc[key(s)] += int((lp.argmax(1) == yb).sum())
    acc = {k: round(100 * v / len(yt), 2) for k, v in correct.items()}
    avg = {k: round(100 * v / len(yt), 2) for k, v in avgc.items()}
    by_size = {r: round(float(np.mean([acc[key(s)] for s in S if len(s) == r])), 3) for r in range(1, K + 1)}
    return acc, avg, by_size


@torch.no_grad()
def fold_to_project(model, K, widths, static):
    """Fold the trunk BatchNorms into the convs and load the result into fluid_mpi's own model classes
    (same keys and shapes as today's checkpoints); returns fluid_mpi's accuracy_report."""
    from fluid_mpi.model.evaluate import accuracy_report
    from fluid_mpi.model.models import FluidCNN, SlicedCNN, Widths, subset_key

    def folded(t):
        sd = {}
        for conv, bn in (("conv1", "bn1"), ("conv2", "bn2")):
            c = getattr(t, conv)
            w, b = c.weight.clone(), c.bias.clone()
            if t.bn:
                n = getattr(t, bn)
                sc = n.weight / torch.sqrt(n.running_var + n.eps)
                w, b = w * sc[:, None, None, None], (b - n.running_mean) * sc + n.bias
            sd[conv + ".weight"], sd[conv + ".bias"] = w, b
        sd["fc.weight"], sd["fc.bias"] = t.fc.weight.clone(), t.fc.bias.clone()
        return sd
    if static:
        m = SlicedCNN(K, Widths(*widths))
        m.trunk.load_state_dict(folded(model.groups[0]))
        m.classifier.load_state_dict(model.heads["0"].state_dict())
        return accuracy_report(m, "static", TE)
    m = FluidCNN(K, Widths(*widths))
    for g in range(K):
        m.groups[g].load_state_dict(folded(model.groups[g]))
        m.heads.single[g].load_state_dict(model.heads[key((g,))].state_dict())
    for s in subsets(K):
        if len(s) > 1:
            m.heads.combined[subset_key(s)].load_state_dict(model.heads[key(s)].state_dict())
    return accuracy_report(m, "fluid", TE)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="joint", choices=["static", "nested", "joint"])
    p.add_argument("--parts", type=int, default=2)
    p.add_argument("--widths", default="2,4,8")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--wd", type=float, default=0.0)
    p.add_argument("--sched", default="cos", choices=["cos", "onecycle"])
    p.add_argument("--aug", default="none", choices=["none", "shift", "affine"])
    p.add_argument("--aug-strength", type=float, default=1.0)
    p.add_argument("--ls", type=float, default=0.0)
    p.add_argument("--bn", action="store_true")
    p.add_argument("--hh", type=int, default=0)
    p.add_argument("--kd", type=float, default=0.0)
    p.add_argument("--T", type=float, default=2.0)
    p.add_argument("--w-single", type=float, default=1.0)
    p.add_argument("--headfit", type=int, default=0)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--tag", default="")
    p.add_argument("--check-fold", action="store_true")
    p.add_argument("--log", default="runs/accuracy-probes.jsonl")
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"))
    a = p.parse_args()
    a.widths = [int(v) for v in a.widths.split(",")]
    random.seed(a.seed)
    np.random.seed(a.seed)
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    tr, te = load_split(a.data_dir, "train"), load_split(a.data_dir, "test")
    if a.limit:
        tr = tr.take(a.limit)
    x, y = to_tensor_batch(tr.images), torch.from_numpy(tr.labels)
    xt, yt = to_tensor_batch(te.images), torch.from_numpy(te.labels)
    t0, c0 = time.perf_counter(), time.process_time()
    model = train(a, x, y, gen)
    secs, cpu = round(time.perf_counter() - t0, 1), round(time.process_time() - c0, 1)
    acc, avg, by_size = evaluate(model, xt, yt)
    full = key(tuple(range(model.K)))
    groups = [acc[str(g)] for g in range(model.K)] if a.method != "static" else []
    rec = {"tag": a.tag, "args": {k: v for k, v in vars(a).items() if k not in ("log", "tag")},
           "HA": acc[full], "groups": groups, "by_size": by_size, "subsets": acc, "avg": avg,
           "train_s": secs, "cpu_s": cpu}
    if a.check_fold and a.hh == 0:
        global TE
        TE = te
        rep = fold_to_project(model, a.parts, a.widths, a.method == "static")
        rec["fold_check"] = {"project_full": rep["full"], "project_subsets": rep.get("subsets"),
                             "equal": rep["full"] == acc[full] and (a.method == "static" or rep["subsets"] == acc)}
    line = json.dumps(rec)
    print(line, flush=True)
    Path(a.log).parent.mkdir(parents=True, exist_ok=True)
    with open(a.log, "a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main()
