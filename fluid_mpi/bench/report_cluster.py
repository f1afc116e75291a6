"""The ``bench cluster`` section of the benchmark's report: the comparison over TCP between the hosts
of the virtual cluster, per link and compute setting."""
from __future__ import annotations


def _cpus(c) -> str:
    return "full speed" if not c else f"{c:g} CPU per host"


def cluster_lines(c: dict | None) -> list[str]:
    """Markdown tables of the cluster figures (nothing when ``bench cluster`` has not been run)."""
    if not c:
        return []
    lines = ["", "## Over TCP between hosts (`fluid-mpi bench cluster`)", "",
             "**These figures come from network namespaces on one machine** (the virtual cluster of "
             "docs/vcluster.md: one rank per host, a veth cable per host to a bridge, mpirun in `head`, "
             "`--mca btl tcp,self`), not from separate boards: the hosts share this machine's cores and memory. "
             "Links are shaped with `tbf` on both ends of every cable; delay and loss cannot be emulated (this kernel "
             "has no `netem`). Slower compute is a CFS quota on each rank's host (`vcluster slow HOST --cpus F`; "
             "`head` only runs mpirun and is not slowed).", "",
             # its own provenance: `bench` merges an earlier `bench cluster`'s OUT/cluster.json into its page
             *([f"Command: `{c['command']}`, {c['date']}.", ""] if c.get("command") and c.get("date") else []),
             f"Batch {c['batch']}; median of {c['reps']} interleaved repetitions per row (min in brackets for the "
             f"ratios: the lowest ratio within one repetition). The first repetition presents "
             f"{c['probe_images']:,} × CPU share inputs; the later ones about {c['window_s']} s of inputs at the "
             f"speed the first measured. *Bytes per image*: what the ranks' hosts sent to each other during the "
             f"run (switch-port counters before and after, mpirun's own traffic to `head` excluded; start-up "
             f"included), divided by the images answered. Wall time: {c['wall_s']} s.", "",
             "*Load*: the machine's 1-minute load average during the setting (2 cores: above ~2, other processes "
             "were competing for them). *Quota bound*: the share of CFS periods in which the `--cpus` quota "
             "throttled the ranks' hosts (low: the machine's load, not the quota, limited them).", "",
             "| link | compute | Fluid HT / Static | Fluid HT / Dynamic's best width | Fluid HT images/s | "
             "Fluid HA images/s | Fluid HA bytes per image | Static bytes per image | Fluid HT bytes per image | "
             "load | quota bound |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for st in c["settings"]:
        q, tp = st["ratios"], {(r["family"], r["variant"]): r for r in st["rows"]}
        ha, ht, static = tp[("fluid", "HA")], tp[("fluid", "HT")], tp[("static", "split")]
        lines.append(
            f"| {st['link']} | {_cpus(st['cpus'])} | "
            f"{q['fluid_ht_over_static']}× (min {q['fluid_ht_over_static_min']}) | "
            f"{q['fluid_ht_over_dynamic_best']}× (min {q['fluid_ht_over_dynamic_best_min']}) | "
            f"{ht['images_per_s']:.0f} | {ha['images_per_s']:.0f} ({ha['min']:.0f}–{ha['max']:.0f}) | "
            f"{_bytes(ha)} | {_bytes(static)} | {_bytes(ht)} | {_load(st.get('load_avg'))} | "
            f"{'—' if st.get('throttled') is None else format(st['throttled'], '.0%')} |")
    names = [f"{r['family']} {r['variant']}" for r in c["settings"][0]["rows"]]
    lines += ["", "Every row (images/s, median (min–max)):", "",
              "| link | compute | " + " | ".join(names) + " |",
              "|---|---|" + "---:|" * len(c["settings"][0]["rows"])]
    for st in c["settings"]:
        cells = [f"{r['images_per_s']:.0f} ({r['min']:.0f}–{r['max']:.0f})" for r in st["rows"]]
        lines.append(f"| {st['link']} | {_cpus(st['cpus'])} | " + " | ".join(cells) + " |")
    failed = [f"- {st['link']}, {_cpus(st['cpus'])}, {r['family']} {r['variant']}: {e}" for st in c["settings"]
              for r in st["rows"] for e in r.get("errors", [])]
    if failed:
        lines += ["", "Runs that failed (counted as 0 images/s in their row; the end of mpirun's stderr):", ""] + failed
    return lines


def _load(values: list | None) -> str:
    return "—" if not values else f"{min(values):.1f}–{max(values):.1f}"


def _bytes(row: dict) -> str:
    v = row.get("bytes_per_image")
    return "—" if v is None else f"{v:,.0f}"
