"""OUT/uneven.md from ``bench uneven``'s results (see uneven.py)."""
from __future__ import annotations

from pathlib import Path

from .uneven import DEADLINE_OVER_P99, PERIOD_MS, SETTINGS, SLOW_HOST, SLOW_SHARE, STALL_EVERY_S, STALL_S

LABELS = {"equal": "every host at the same speed",
          "slow": f"{SLOW_HOST} at {SLOW_SHARE:g} × the others' CPU",
          "stall": f"{SLOW_HOST} frozen {STALL_S:g} s every {STALL_EVERY_S:g} s"}


def _cell(v, fmt: str = "{:.2f}") -> str:
    return "—" if v is None else fmt.format(v)


def write_report(r: dict, path: Path) -> None:
    lines = ["# Uneven devices on the virtual cluster: measured", "",
             f"Written by `fluid-mpi bench uneven` on {r['written']} ({r['wall_s']} s). Test data: {r['data']}; "
             f"batch {r['batch']}; medians of {r['reps']} interleaved repetitions per row. One rank per emulated "
             "host, mpirun in `head` over TCP; the hosts share this machine's cores, each limited to cores / K "
             f"CPUs (at most one; a CFS quota over a {PERIOD_MS:g} ms period, so that a host is evenly slower).", ""]
    for run in r["runs"]:
        k = run["k"]
        lines += [f"## K = {k} ({run['cpus_per_host']:g} CPU per host; deadline {run['deadline_ms']:g} ms = "
                  f"{DEADLINE_OVER_P99:g} × HA's p99 in a first run on equal devices, {run['probe_p99_ms']} ms)", ""]
        for setting in SETTINGS:
            rows = run["settings"][setting]
            lines += [f"### {LABELS[setting]}", "",
                      "| run | runs ok | images/s (min–max) | p50 / p95 / p99 ms | accuracy % | answers by subset |",
                      "|---|---:|---:|---|---:|---|"]
            for label, f in rows.items():
                share = ", ".join(f"{key} {100 * v:.1f} %" for key, v in (f["subset_share"] or {}).items()) or "—"
                span = f.get("images_per_s_range")  # absent from reports written before it was kept
                spread = f" ({span[0]:,.0f}–{span[1]:,.0f})" if span else ""
                lines.append(f"| {label} | {f['ok']}/{f['runs']} | {_cell(f['images_per_s'], '{:,.0f}')}{spread} | "
                             f"{_cell(f['p50'])} / {_cell(f['p95'])} / {_cell(f['p99'])} | {_cell(f['accuracy'])} | {share} |")
            lines.append("")
        lines += ["Goals:", "", "| goal | measured | verdict |", "|---|---|---|"]
        for g in run["goals"]:
            verdict = "— (no figure)" if g["met"] is None else "✔ met" if g["met"] else "✘ not met"
            lines.append(f"| {g['goal']} | {g['measured']} | {verdict} |")
        lines.append("")
    path.write_text("\n".join(lines))
