"""The Markdown page of ``fluid-mpi bench faults`` (docs/fault-results.md when published)."""
from __future__ import annotations


def _cell(st: dict | None, unit: str = " s") -> str:
    if not st:
        return "—"
    if st["n"] == 1:
        return f"{st['median']:g}{unit}"
    return f"{st['median']:g}{unit} ({st['min']:g}–{st['max']:g})"


def _verdict(met: bool | None) -> str:
    return "" if met is None else (" ✔" if met else " ✘")


def render(r: dict) -> str:
    """Tables of the medians (min–max) per fault kind, the goals, and every run."""
    lines = [
        "# Device faults on the virtual cluster: measured",
        "",
        f"Written by `{r['command']}` on {r['date']} ({r['wall_s']} s); load average before "
        f"{', '.join(map(str, r['load_before']))}, after {', '.join(map(str, r['load_after']))}. "
        "Network namespaces on one 2-core machine (docs/vcluster.md), one rank per emulated host, mpirun on "
        "`head`, `fluid-mpi launch` with warm starts. Each run's fault comes after a seeded random number of "
        f"answers; {r['reps']} repetition(s) per kind, round-robin; median (min–max).",
        "",
        "Detection = fault → the launcher's `host_lost` event; next answer = fault → first answer of the "
        "relaunched attempt; after/capacity = answers/s from 0.5 s after that answer to the end (or the "
        "power-on) over a clean run on the surviving devices alone, in the same repetition; rejoin = "
        "power-on → first answer of the attempt that includes the device again.",
        "",
        "| fault (K, mode, batch) | runs ok | detection | fault → next answer (goal) | after / capacity "
        "| power-on → answering again (goal 5 s) |",
        "|---|---:|---|---|---|---|",
    ]
    for row in r["rows"]:
        rejoin = (_cell(row["rejoin_s"]) + _verdict(row.get("rejoin_met"))) if "rejoin_met" in row else "—"
        lines.append(
            f"| {row['label']} (K={row['k']}, {row['mode'].upper()}, b{row['batch']}) | {row['ok']}/{row['runs']} "
            f"| {_cell(row['detected_s'])} | {_cell(row['next_answer_s'])} (≤ {row['goal_next_s']:g} s)"
            f"{_verdict(row['next_met'])} | {_cell(row['after_over_capacity'], '')} | {rejoin} |")
    lines += ["", "The freeze's goal is set by `--rank-timeout` (2 s in these runs): infer's silence deadline "
              "detects it, so answers resume within rank-timeout + 3 s.", "",
              "## Every run", "",
              "| fault | rep | exit | answered | duplicates | detection s | next answer s | after img/s "
              "| capacity img/s | rejoin s | error |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for label, runs in r["runs"].items():
        for x in runs:
            cells = [x.get(k) for k in ("detected_s", "next_answer_s", "after_rate", "capacity_rate", "rejoin_s")]
            err = (x.get("error") or "").replace("|", "/").replace("\n", " ")[:120]
            lines.append(f"| {label} | {x['rep']} | {x['code']} | {x['answered']}/{x['images']} | {x['duplicates']} | "
                         + " | ".join("—" if c is None else f"{c:g}" for c in cells) + f" | {err} |")
    return "\n".join(lines) + "\n"
