"""The benchmark's report: ``results.json`` (every figure), ``results.md`` (tables in the paper's terms,
the goals with verdicts computed from the figures) and PNG plots under ``img/`` (throughput by family and
mode, accuracy by surviving ranks, timelines around a failure). The layout is that of ``docs/``, so the
three can be copied there as they are; nothing in ``results.md`` is meant to be edited by hand."""
from __future__ import annotations

import json
from pathlib import Path

from .report_cluster import cluster_lines
from .report_latency import latency_lines, latency_plot, scenario_table
from ..model.partition import dynamic_width

IMG = "img"  # plots go to OUT/img/, as docs/results.md expects them in docs/img/
HAND_EDIT_MARK = "Everything above was written by `fluid-mpi bench`; anything below this line was added by hand."
RANKS_OWN_LOAD = 2.0  # a 2-rank run keeps about two processes runnable: load above that came from elsewhere


def _fmt(v, spec=".1f") -> str:
    return "—" if v is None else format(v, spec)


def verdict(value: float | None, target: float, at_most: bool = False) -> str:
    """✔ only when the figure meets the goal (``value >= target``, or ``<=`` with ``at_most``)."""
    if value is None:
        return "— not measured"
    if (value <= target) if at_most else (value >= target):
        return "✔ met"
    return f"✘ not met (short by {abs(value - target):.3g})"


def goals(r: dict) -> list[dict]:
    """The project's goals against this run's figures: goal, measured, value, target, at_most, verdict."""
    k, rows = r["config"]["parts"], []

    def add(goal: str, measured: str, value, target: float, at_most: bool = False) -> None:
        rows.append({"goal": goal, "measured": measured, "value": value, "target": target, "at_most": at_most,
                     "verdict": verdict(value, target, at_most)})

    q64, q1 = r["ratios"].get("64"), r["ratios"].get("1")
    for b, q, target in (("64", q64, 0.9), ("1", q1, 0.75)):
        if q:
            add(f"Fluid HT ≥ {target} × limit ({k} × one sub-network in-process), batch {b}",
                f"{q['fluid_ht_over_limit']} (repetitions: min {q.get('fluid_ht_over_limit_min', '—')})",
                q["fluid_ht_over_limit"], target)
    if q64:
        add("Fluid HA ≥ 0.8 × HA limit (one sub-network + the combined head in-process), batch 64",
            f"{q64['fluid_ha_over_limit']} (repetitions: min {q64.get('fluid_ha_over_limit_min', '—')})",
            q64["fluid_ha_over_limit"], 0.8)
        # HA's speed-up from K devices, at the same accuracy: against the whole Fluid model on one core (the
        # old goal, HA on K ranks against group 0 alone on one rank, compared a smaller, less accurate model)
        add("Fluid HA ≥ 1.0 × the whole Fluid model in-process (same accuracy), batch 64",
            f"{_fmt(q64.get('fluid_ha_over_whole_model'), '.3f')}×", q64.get("fluid_ha_over_whole_model"), 1.0)
    for b, q in (("64", q64), ("1", q1)):
        if not q:
            continue
        for key, base, target in (("static", "Static", 2.5), ("dynamic_best", "Dynamic's best width", 2.0)):
            low = q.get(f"fluid_ht_over_{key}_min")
            add(f"Fluid HT ≥ {target} × {base} in every repetition, batch {b} (paper)",
                f"min {_fmt(low, '.3f')}× (median {q[f'fluid_ht_over_{key}']}×)", low, target)
    if q1 and q1.get("fluid_ha_p50_over_whole_model") is not None:
        ms = r["reference"]["1"]["fluid_whole_latency_ms"]
        add("Fluid HA p50 latency ≤ 1.3 × the whole Fluid model's in-process latency, batch 1",
            f"{q1['fluid_ha_p50_over_whole_model']}× ({ms:.3f} ms in-process)", q1["fluid_ha_p50_over_whole_model"],
            1.3, at_most=True)
    one = r["reference"].get("64", {}).get("fluid_subnetwork")
    for f in r["failures"]:
        if f["family"] != "fluid" or f["victim"] == 0 or not one:
            continue  # rank 0's death is a take-over: no before/after rate within one coordinator
        after = f.get("images_per_s_after")
        ratio = round(after / one, 3) if after else None
        add(f"Fluid {f['variant']}, rank {f['victim']} killed: images/s after the failure ≥ 0.9 × one "
            f"sub-network in-process ({one:,.0f} img/s, batch 64)", f"{_fmt(after)} img/s ({_fmt(ratio, '.3f')})",
            ratio, 0.9)
    budget = r.get("budget_s")
    if budget:
        kind = "`bench --quick`" if r["config"].get("quick") else "the full bench"
        add(f"{kind} takes ≤ {budget:.0f} s", f"{r['wall_s']} s", r["wall_s"], budget, at_most=True)
    c = r.get("cluster")
    if c and c.get("budget_s"):
        kind = "`bench cluster --quick`" if c.get("quick") else "`bench cluster`"
        add(f"{kind} takes ≤ {c['budget_s']:.0f} s (its own budget)", f"{c['wall_s']} s", c["wall_s"], c["budget_s"],
            at_most=True)
    return rows


def _header(r: dict) -> list[str]:
    """Title, provenance (command, date, machine, versions), data, wall time, and the training table."""
    env, wall = r.get("environment") or {}, r["wall_s"]
    lines = [f"# fluid-mpi benchmark: K = {r['config']['parts']} ranks", "",
             "Written by `fluid-mpi bench` (fluid_mpi/bench/report.py); every figure is in `results.json` beside it."]
    if env:
        lines += ["", f"Command: `{env.get('command')}`, {env.get('date')}.",
                  f"Machine: {env.get('machine')}, {env.get('os')}; Python {env.get('python')}, "
                  f"torch {env.get('torch')}, {env.get('mpi')}, mpi4py {env.get('mpi4py')}."]
    lines += ["", f"Data: {r['data']}. Wall time of the whole benchmark: {wall} s "
              f"({int(wall // 60)} min {int(wall % 60)} s)."]
    if r.get("load_avg"):
        shared = max(r["load_avg"]) > RANKS_OWN_LOAD
        lines += ["", f"1-minute load average of the machine during the throughput runs: {min(r['load_avg'])}–"
                  f"{max(r['load_avg'])} ({env.get('machine', '?')}; " +
                  ("above the ranks' own load, other users' runs were sharing the cores: the ratios pair figures "
                   "measured side by side, the absolute speeds do not carry over)." if shared else
                   "no more than the ranks' own load).")]
    if r.get("training"):
        lines += ["", "## Training (per family; a reused checkpoint shows its original training)", "",
                  "| family | epochs per stage | batch | lr | seed | training images | training s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for fam, t in r["training"].items():
            lines.append(f"| {fam} | {t.get('epochs')} | {t.get('batch_size')} | {t.get('lr')} | {t.get('seed')} | "
                         f"{t.get('train_images', '—')} | {_fmt(t.get('train_seconds'))} |")
    return lines


def markdown(r: dict) -> str:
    """The whole ``results.md`` from the results dict (nothing in it is written by hand)."""
    k = r["config"]["parts"]
    cfg, bs = r["config"], list(r["reference"])
    lines = _header(r) + [
        "", f"## Throughput (images/s, no failure; median of {cfg.get('reps', 1)} interleaved repetitions, "
        "min–max in brackets)", "",
        f"Each mpirun presents about {cfg.get('window_s', '?')} s of inputs (`--limit`/`--repeat`): in the first "
        "repetition at the speed of its in-process reference, in the later ones at the speed the first measured; "
        "`images_per_s` counts the inference loop only, start-up excluded. "
        "The repetitions go round-robin over the rows and the references, so no row runs 5 times in a row.", ""]
    head, rows = scenario_table(r, k)
    lines += head
    for (fam, var, ranks), by_b in rows.items():
        lines.append(f"| {fam} | {var} | {ranks} | " + " | ".join(_spread(by_b.get(b)) for b in bs) + " |")
    for key, label in (("static_single_process", "static, one process (1 thread), reference"),
                       ("limit", f"limit: {k} × one Fluid sub-network in-process"),
                       ("concurrent_limit", f"machine's ceiling: {k} sub-networks in {k} processes at once, no MPI"),
                       ("ha_limit", "HA limit: one sub-network's features + the combined head in-process")):
        lines.append(f"| — | {label} | 1 | " + " | ".join(_fmt(r["reference"][b].get(key)) for b in bs) + " |")
    lines += ["", "## The paper's claims and the goals' ratios, measured (verdicts under Against the goals)", "",
              "Ratios of the medians above; *min* is the lowest of the same ratio taken within each repetition.", "",
              "| batch | Fluid HT / Static (paper 2.5×) | "
              f"Fluid HT / Dynamic width {k} (paper 2×) | Fluid HT / Dynamic's best width | "
              "Fluid HT / limit | Fluid HT / machine's ceiling | Fluid HA / HA limit | Fluid HA on K ranks / on one | "
              "Fluid HA / whole model in-process (same accuracy) |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for b in bs:
        q = r["ratios"][b]
        cells = [f"{q['fluid_ht_over_static']}× (min {q.get('fluid_ht_over_static_min', '—')})",
                 f"{q['fluid_ht_over_dynamic']}×",
                 f"{q.get('fluid_ht_over_dynamic_best', '—')}× "
                 f"(min {q.get('fluid_ht_over_dynamic_best_min', '—')})",
                 f"{q['fluid_ht_over_limit']}", f"{q.get('fluid_ht_over_concurrent', '—')}",
                 f"{q.get('fluid_ha_over_limit', '—')}",
                 f"{q.get('fluid_ha_k_over_one', '—')}×", f"{q.get('fluid_ha_over_whole_model', '—')}×"]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines += latency_lines(r)
    lines += ["", f"Fluid HA accuracy − Static accuracy: {r['ratios']['fluid_ha_minus_static_pp']:+.2f} pp "
              "(paper: comparable).", "", "## Accuracy by surviving ranks (test set, %)", "",
              "| family | all ranks | " + " | ".join(f"survivors {s}" for s in _survivor_keys(k)) + " |",
              "|---|---:|" + "---:|" * len(_survivor_keys(k))]
    for fam, acc in r["accuracy"].items():
        cells = [_fmt(_acc_for(fam, acc, s, k), ".2f") for s in _survivor_keys(k)]
        lines.append(f"| {fam} | {acc['full']:.2f} | " + " | ".join(cells) + " |")
    lines += _failure_lines(r) + ["", "## Against the goals (verdicts computed from the figures above)", "",
                                  "| goal | measured | verdict |", "|---|---|---|"]
    lines += [f"| {g['goal']} | {g['measured']} | {g['verdict']} |" for g in goals(r)]
    lines += cluster_lines(r.get("cluster"))
    lines += ["", f"![throughput]({IMG}/throughput.png)", "", f"![latency]({IMG}/latency.png)", "",
              f"![accuracy]({IMG}/accuracy.png)", "",
              f"![timeline]({IMG}/timeline.png)", "", "---", "", HAND_EDIT_MARK, ""]
    return "\n".join(lines)


def _spread(t: dict | None) -> str:
    """A throughput cell: the median, and min–max of the repetitions when there are several."""
    if t is None:
        return "—"
    if t.get("min") is None or len(t.get("runs", [])) < 2:
        return _fmt(t["images_per_s"])
    return f"{t['images_per_s']:.1f} ({t['min']:.0f}–{t['max']:.0f})"


def _failure_lines(r: dict) -> list[str]:
    """The tables of the runs with a rank killed, and of failure detection."""
    lines = ["", "## One rank killed halfway (SIGKILL, batch 64)", "",
             "*accuracy, all answers*: every answer in the run's predictions file, whoever gave it. *accuracy, "
             "final coordinator*: the answers of the coordinator that wrote the summary (after a take-over, the "
             "new coordinator's answers only). *after failure*: from the detection of the failure to the end.", "",
             "| family | variant | killed rank | outcome | answered | accuracy %, all answers | accuracy %, final "
             "coordinator | after failure: images/s | after failure: accuracy % | detection ms |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for f in r["failures"]:
        outcome = "continues" + (" (take-over)" if f.get("takeover") else "") if f["continued"] else "stops"
        lines.append(f"| {f['family']} | {f['variant']} | {f['victim']} | {outcome} | {f['answered']}/"
                     f"{f['images'] or '?'} | {_fmt(f['accuracy'], '.2f')} | {_fmt(f.get('accuracy_summary'), '.2f')} | "
                     f"{_fmt(f.get('images_per_s_after'))} | {_fmt(f.get('accuracy_after'), '.2f')} | "
                     f"{_fmt(f['detected_ms'])} |")
    lines += ["", "## Failure detection (Fluid HT, rank 1)", "", "| how | median ms | min | max | runs |",
              "|---|---:|---:|---:|---:|"]
    for how, d in r["detection"].items():
        lines.append(f"| {how} | {_fmt(d['median_ms'])} | {_fmt(d['min_ms'])} | {_fmt(d['max_ms'])} | {d['runs']} |")
    lines += ["", f"`hang` includes the coordinator's deadline (--rank-timeout {r['config']['rank_timeout']} s)."]
    return lines


def _survivor_keys(k: int) -> list[str]:
    from ..model.models import all_subsets, subset_key

    return [subset_key(s) for s in all_subsets(k) if len(s) < k]


def _acc_for(family: str, acc: dict, survivors: str, k: int):
    """Accuracy a family still has with these ranks alive (None: it cannot run)."""
    alive = sorted(int(v) for v in survivors.split("+"))
    if family == "fluid":
        return acc["subsets"].get(survivors)
    if family == "dynamic":
        width = dynamic_width(alive, k)
        return acc["subsets"].get(str(width)) if width else None
    return None


def plots(r: dict, out: Path) -> list[str]:
    """Three PNGs in ``out``; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k, made = r["config"]["parts"], []
    shown = [b for b in ("64", "1") if b in r["reference"]] or list(r["reference"])[:2]
    fig, axes = plt.subplots(1, len(shown), figsize=(7 * len(shown), 4), squeeze=False)
    for ax, b in zip(axes[0], shown):
        rows = [t for t in r["throughput"] if str(t["batch"]) == b]
        names = [f"{t['family']}\n{t['variant']}".replace(" on one", "\non one") for t in rows] + ["limit", "HA limit"]
        ref = r["reference"][b]
        vals = [t["images_per_s"] or 0 for t in rows] + [ref["limit"], ref.get("ha_limit", 0)]
        err = [[v - (t.get("min") or v) for v, t in zip(vals, rows)] + [0, 0],
               [(t.get("max") or v) - v for v, t in zip(vals, rows)] + [0, 0]]
        colors = ["#999999" if t["family"] == "static" else "#6a9fd4" if t["family"] == "dynamic" else "#2ca25f"
                  for t in rows] + ["#d95f02", "#e6ab02"]
        ax.bar(names, vals, color=colors, yerr=err, capsize=3)
        ax.set_title(f"batch {b}: images/s (median, min–max bars)")
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)
    made.append("throughput.png")
    made.append(latency_plot(r, out, plt))

    keys = ["all"] + _survivor_keys(k)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (fam, acc) in enumerate(r["accuracy"].items()):
        vals = [acc["full"]] + [_acc_for(fam, acc, s, k) or 0 for s in keys[1:]]
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
    """``out/results.json``, ``out/results.md`` and ``out/img/*.png``; adds ``goals`` and ``plots`` to ``r``."""
    out.mkdir(parents=True, exist_ok=True)
    r["goals"] = goals(r)
    (out / "results.json").write_text(json.dumps(r, indent=2) + "\n")  # the figures survive a plotting error
    try:
        (out / IMG).mkdir(exist_ok=True)
        r["plots"] = [f"{IMG}/{name}" for name in plots(r, out / IMG)]
    except ImportError:
        r["plots"] = []  # matplotlib is the optional [plots] extra
    (out / "results.md").write_text(markdown(r))
    (out / "results.json").write_text(json.dumps(r, indent=2) + "\n")
