"""OUT/accuracy.md from ``bench accuracy``'s results (see accuracy.py)."""
from __future__ import annotations

from pathlib import Path

from .accuracy import ENSEMBLE_GAIN, GROUP_SPREAD, STATIC_SLACK, fluid_keys

LABELS = {"static": "Static", "dynamic": "Dynamic", "fluid": "Fluid", "fluid-eq": "Fluid, equal cost"}


def label(fam: str) -> str:
    """A row's name on the page: a --fluid-widths row is named by its widths (``Fluid at 2,8,16``)."""
    return LABELS.get(fam) or f"Fluid at {fam[len('fluid-'):]}"


def _w(cost: dict) -> str:
    w = cost["widths"]
    return f"{w['c1']},{w['c2']},{w['hidden']}"


def _cost_cells(cost: dict) -> str:
    return f"{_w(cost)} | {cost['macs']:,} | {cost['params']:,} | {cost['ms_b1']:.3f} / {cost['ms_b64']:.2f}"


def _seeds(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def _mark(ok: bool | None) -> str:
    return "—" if ok is None else "✔" if ok else "✘"


def setting_table(row: dict) -> list[str]:
    """One preset at one K: a line per model, then the Fluid rows' goals."""
    lines = [f"### {row['preset']}, K = {row['k']} (seeds {', '.join(map(str, row['seeds']))})", "",
             "| model | per-device widths | multiply-adds / image / device | parameters / device | "
             "forward ms, batch 1 / 64 | accuracy % (HA for Fluid) | seeds |",
             "|---|---|---:|---:|---:|---:|---|"]
    for fam in [f for f in ("static", "dynamic") if f in row] + fluid_keys(row):
        r = row[fam]
        acc, seeds = (r["ha"], r["ha_seeds"]) if "ha" in r else (r["full"], r["full_seeds"])
        only = f" (seed {', '.join(map(str, r['only_seeds']))} only)" if r.get("only_seeds") else ""
        lines.append(f"| {label(fam)} | {_cost_cells(r['cost'])} | {acc:.2f} | {_seeds(seeds)}{only} |")
    rep = row.get("replicated")
    if rep:
        lines.append(f"| whole Fluid model on every device (replication) | {_cost_cells(rep['cost'])} | "
                     f"{rep['accuracy']:.2f} | same model as Fluid |")
    lines.append("")
    if row.get("missing"):
        lines.append("- Not trained (`--no-train`): " + "; ".join(map(label, row["missing"])) + ".")
    for fam in fluid_keys(row):
        r = row[fam]
        sizes = ", ".join(f"{n}: {v:.2f}" for n, v in r["by_size"].items())
        named = f" ({_w(r['cost'])})" if fam in LABELS else ""  # a sweep row's name holds its widths
        lines.append(f"- **{label(fam)}**{named}: each group alone {', '.join(f'{g:.2f}' for g in r['groups'])}; "
                     f"mean by number of groups {sizes}; HT mix {r['ht_mix']:.2f}.")
        if "goals" in r:
            g = r["goals"]
            gain = ENSEMBLE_GAIN.get(row["k"])
            lines.append(f"  Goals: HA ≥ Static − {STATIC_SLACK} pp {_mark(g['ha_vs_static'])}; every group "
                         f"within {GROUP_SPREAD} pp of the best {_mark(g['groups_even'])}; HA ≥ best group + "
                         f"{gain if gain is not None else '—'} pp {_mark(g['ensemble_gain'])}; "
                         f"accuracy non-decreasing with the number of groups {_mark(g['non_decreasing'])}.")
    dyn = row.get("dynamic")
    if dyn:
        lines.append("- **Dynamic** by width (slices): " + ", ".join(f"{n}: {v:.2f}" for n, v in dyn["widths_acc"].items())
                     + ".")
    if rep:
        lines.append(f"- Cluster images/s at batch 64, bound from one device's forward time (K × its rate, no "
                     f"transport): Fluid HT {rep['fluid_ht_ips_bound']:,}, replication {rep['cluster_ips_bound']:,}.")
    return lines + [""]


def write_report(results: dict, path: Path) -> None:
    """The whole page: how it was made, then one table per preset and K."""
    lines = ["# Accuracy by width preset and K: measured", "",
             f"Written by `fluid-mpi bench accuracy` on {results['written']} ({results['wall_s']} s). Test data: "
             f"{results['data']}; {results['epochs']} epochs"
             + (f" on the first {results['limit']} training images" if results["limit"] else "")
             + f"; seeds {', '.join(map(str, results['seeds']))} (accuracy cells: the mean; the last column each seed).",
             "",
             "Per-device cost: multiply-adds per image and parameters on one device of a K-device run (Fluid: "
             "a group and its own head; Static/Dynamic: a slice, which reads every slice's channels; "
             "replication: the whole Fluid model). Forward time: one thread of this machine, random weights, "
             "median of 20 calls; a Static/Dynamic slice's compute only (the exchanges between its layers "
             "come on top). *Equal cost*: Fluid groups widened until one costs what a Static slice costs.",
             ""]
    for row in results["rows"]:
        lines += setting_table(row)
    if results["log"]:
        lines += ["Training in this run: " + "; ".join(results["log"]) + ".", ""]
    path.write_text("\n".join(lines))
