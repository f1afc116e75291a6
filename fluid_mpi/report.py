"""The benchmark's report: ``results.json`` (every figure), ``results.md`` (tables in the paper's terms)
and PNG plots (throughput by family and mode, accuracy by surviving ranks, timelines around a failure)."""
from __future__ import annotations

import json
from pathlib import Path


def _fmt(v, spec=".1f") -> str:
    return "—" if v is None else format(v, spec)


def markdown(r: dict) -> str:
    k = r["config"]["parts"]
    lines = [f"# fluid-mpi benchmark: K = {k} ranks", "",
             f"Data: {r['data']}. Wall time of the whole benchmark: {r['wall_s']} s.", "",
             f"## Throughput (images/s, no failure; median of {r['config'].get('reps', 1)} runs)", "",
             "| family | variant | " + " | ".join(f"batch {b}" for b in r["reference"]) + " |",
             "|---|---|" + "---:|" * len(r["reference"])]
    rows: dict = {}
    for t in r["throughput"]:
        rows.setdefault((t["family"], t["variant"]), {})[str(t["batch"])] = t["images_per_s"]
    for (fam, var), by_b in rows.items():
        lines.append(f"| {fam} | {var} | " + " | ".join(_fmt(by_b.get(b)) for b in r["reference"]) + " |")
    for key, label in (("static_single_process", "static, one process (1 thread), reference"),
                       ("limit", f"limit: {k} × one Fluid sub-network in-process")):
        lines.append(f"| — | {label} | " + " | ".join(_fmt(r["reference"][b][key]) for b in r["reference"]) + " |")
    lines += ["", "## The paper's claims, measured", "", "| batch | Fluid HT / Static (paper 2.5×) | "
              f"Fluid HT / Dynamic width {k} (paper 2×) | Fluid HT / Dynamic's best width | "
              "Fluid HT / limit (goal ≥ 0.9) |", "|---:|---:|---:|---:|---:|"]
    for b in r["reference"]:
        q = r["ratios"][b]
        lines.append(f"| {b} | {q['fluid_ht_over_static']}× | {q['fluid_ht_over_dynamic']}× | "
                     f"{q.get('fluid_ht_over_dynamic_best', '—')}× | {q['fluid_ht_over_limit']} |")
    lines += ["", f"Fluid HA accuracy − Static accuracy: {r['ratios']['fluid_ha_minus_static_pp']:+.2f} pp "
              "(paper: comparable).", "", "## Accuracy by surviving ranks (test set, %)", "",
              "| family | all ranks | " + " | ".join(f"survivors {s}" for s in _survivor_keys(k)) + " |",
              "|---|---:|" + "---:|" * len(_survivor_keys(k))]
    for fam, acc in r["accuracy"].items():
        cells = [_fmt(_acc_for(fam, acc, s), ".2f") for s in _survivor_keys(k)]
        lines.append(f"| {fam} | {acc['full']:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "## One rank killed halfway (SIGKILL, batch 64)", "",
              "| family | variant | killed rank | outcome | answered | accuracy % | after failure: images/s "
              "| after failure: accuracy % | detection ms |", "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for f in r["failures"]:
        outcome = "continues" + (" (take-over)" if f.get("takeover") else "") if f["continued"] else "stops"
        lines.append(f"| {f['family']} | {f['variant']} | {f['victim']} | {outcome} | {f['answered']}/"
                     f"{f['images'] or '?'} | {_fmt(f['accuracy'], '.2f')} | {_fmt(f.get('images_per_s_after'))} | "
                     f"{_fmt(f.get('accuracy_after'), '.2f')} | {_fmt(f['detected_ms'])} |")
    lines += ["", "## Failure detection (Fluid HT, rank 1)", "", "| how | median ms | min | max | runs |",
              "|---|---:|---:|---:|---:|"]
    for how, d in r["detection"].items():
        lines.append(f"| {how} | {_fmt(d['median_ms'])} | {_fmt(d['min_ms'])} | {_fmt(d['max_ms'])} | {d['runs']} |")
    lines += ["", f"`hang` includes the coordinator's deadline (--rank-timeout {r['config']['rank_timeout']} s).",
              "", "![throughput](throughput.png)", "", "![accuracy](accuracy.png)", "", "![timeline](timeline.png)",
              ""]
    return "\n".join(lines)


def _survivor_keys(k: int) -> list[str]:
    from .model.models import all_subsets, subset_key

    return [subset_key(s) for s in all_subsets(k) if len(s) < k]


def _acc_for(family: str, acc: dict, survivors: str):
    """Accuracy a family still has with these ranks alive (None: it cannot run)."""
    alive = {int(v) for v in survivors.split("+")}
    if family == "fluid":
        return acc["subsets"].get(survivors)
    if family == "dynamic":
        width = 0
        while width in alive:
            width += 1
        return acc["subsets"].get(str(width)) if width else None
    return None


def plots(r: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k, made = r["config"]["parts"], []
    fig, axes = plt.subplots(1, len(r["reference"]), figsize=(6 * len(r["reference"]), 4), squeeze=False)
    for ax, b in zip(axes[0], r["reference"]):
        rows = [t for t in r["throughput"] if str(t["batch"]) == b]
        names = [f"{t['family']}\n{t['variant']}" for t in rows] + ["limit"]
        vals = [t["images_per_s"] or 0 for t in rows] + [r["reference"][b]["limit"]]
        colors = ["#999999" if t["family"] == "static" else "#6a9fd4" if t["family"] == "dynamic" else "#2ca25f"
                  for t in rows] + ["#d95f02"]
        ax.bar(names, vals, color=colors)
        ax.set_title(f"batch {b}: images/s on {k} ranks")
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)
    made.append("throughput.png")

    keys = ["all"] + _survivor_keys(k)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (fam, acc) in enumerate(r["accuracy"].items()):
        vals = [acc["full"]] + [_acc_for(fam, acc, s) or 0 for s in keys[1:]]
        ax.bar([j + 0.27 * (i - 1) for j in range(len(keys))], vals, width=0.27, label=fam)
    ax.set_xticks(range(len(keys)), [f"ranks {s}" for s in keys])
    ax.set_ylim(min(90, ax.get_ylim()[1]), 100)
    ax.set_ylabel("test accuracy %  (0 = cannot run)")
    ax.legend()
    ax.set_title("accuracy by surviving ranks")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)
    made.append("accuracy.png")

    fig, ax = plt.subplots(figsize=(8, 4))
    for variant, tl in r.get("timelines", {}).items():
        pts = tl["timeline"]
        if not pts:
            continue
        span = pts[-1][0]
        width = max(span / 40, 1e-3)
        bins = [0.0] * 41
        for t, n in pts:
            bins[min(int(t / width), 40)] += n
        line, = ax.plot([i * width for i in range(41)], [v / width for v in bins], label=f"Fluid {variant}")
        if tl.get("failure_at_s") is not None:
            ax.axvline(tl["failure_at_s"], linestyle="--", color=line.get_color())
    ax.set_xlabel("seconds since start (dashed: rank 1's death detected, same colour as its run)")
    ax.set_ylabel("images answered per second")
    ax.legend()
    ax.set_title("throughput around a failure")
    fig.tight_layout()
    fig.savefig(out / "timeline.png", dpi=110)
    plt.close(fig)
    made.append("timeline.png")
    return made


def write_report(r: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(r, indent=2) + "\n")
    try:
        r["plots"] = plots(r, out)
    except ImportError:
        r["plots"] = []  # matplotlib is the optional [plots] extra
    (out / "results.md").write_text(markdown(r))
    (out / "results.json").write_text(json.dumps(r, indent=2) + "\n")
