"""Latency beside throughput in the benchmark's report: the per-image latency table (p50/p95/p99 per
scenario and batch size) and the plot ``img/latency.png`` of latency against batch size."""
from __future__ import annotations

from pathlib import Path


def _cell(lat: dict | None) -> str:
    if not lat or lat.get("p50") is None:
        return "—"
    return f"{lat['p50']:.2f} / {lat['p95']:.2f} / {lat['p99']:.2f}"


def scenario_table(r: dict, default_ranks) -> tuple[list[str], dict]:
    """The two header lines of a per-scenario table (one column per batch size) and the throughput rows
    grouped by (family, variant, ranks), each {batch: row}."""
    bs = list(r["reference"])
    head = ["| family | variant | ranks | " + " | ".join(f"batch {b}" for b in bs) + " |",
            "|---|---|---:|" + "---:|" * len(bs)]
    rows: dict = {}
    for t in r["throughput"]:
        rows.setdefault((t["family"], t["variant"], t.get("ranks", default_ranks)), {})[str(t["batch"])] = t
    return head, rows


def latency_lines(r: dict) -> list[str]:
    """Markdown: per-image latency in ms, p50 / p95 / p99, per scenario and batch size."""
    bs = list(r["reference"])
    lines = ["", "## Per-image latency (ms, p50 / p95 / p99; median of the repetitions)", "",
             "From when an input's batch is handed out by the coordinator to when its answer is written (a closed "
             "loop: the coordinator hands out the next batch as soon as a rank is free, so this is the latency of a "
             "loaded system). In-process rows: the median time of one call on one batch, one thread.", ""]
    head, by_scenario = scenario_table(r, "")
    lines += head
    rows = {key: {b: t.get("latency_ms") for b, t in by_b.items()} for key, by_b in by_scenario.items()}
    for (fam, var, ranks), by_b in rows.items():
        lines.append(f"| {fam} | {var} | {ranks} | " + " | ".join(_cell(by_b.get(b)) for b in bs) + " |")
    for key, label in (("fluid_whole_latency_ms", "whole Fluid model in-process (one batch)"),
                       ("static_latency_ms", "whole Static model in-process (one batch)")):
        cells = [f"{r['reference'][b][key]:.2f}" if r["reference"][b].get(key) is not None else "—" for b in bs]
        lines.append(f"| — | {label} | 1 | " + " | ".join(cells) + " |")
    return lines


def latency_plot(r: dict, out: Path, plt) -> str:
    """``out/latency.png``: p50 (line) and p95 (dashed) per-image latency against batch size, log-log."""
    fig, ax = plt.subplots(figsize=(8, 5))
    rows: dict = {}
    for t in r["throughput"]:
        if (t.get("latency_ms") or {}).get("p50") is not None:
            rows.setdefault(f"{t['family']} {t['variant']}", []).append((t["batch"], t["latency_ms"]))
    for name, pts in rows.items():
        pts.sort()
        line, = ax.plot([b for b, _ in pts], [lat["p50"] for _, lat in pts], marker="o", label=name)
        ax.plot([b for b, _ in pts], [lat["p95"] for _, lat in pts], linestyle="--", color=line.get_color())
    ref = sorted((int(b), v.get("fluid_whole_latency_ms")) for b, v in r["reference"].items())
    ax.plot([b for b, _ in ref], [v for _, v in ref], color="black", linestyle=":", marker="x",
            label="whole Fluid model in-process")
    ax.set_xscale("log", base=2)
    ax.set_xticks([b for b, _ in ref], [str(b) for b, _ in ref])
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("per-image latency, ms (solid p50, dashed p95)")
    ax.set_title("latency against batch size")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)
    return "latency.png"
