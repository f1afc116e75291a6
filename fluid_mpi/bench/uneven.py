"""``fluid-mpi bench uneven``: devices of unequal speed on the virtual cluster (network namespaces on this
machine, docs/vcluster.md), one rank per host, mpirun in ``head`` over TCP, for K = 2 and 4.

Settings: every host at the same speed; one host (node2) at a quarter of the others' CPU; one host (node2)
frozen for :data:`STALL_S` every :data:`STALL_EVERY_S` (the freezer, from a thread, during each run). The
hosts share this machine's cores, so each gets ``cores / K`` CPUs (at most one): K hosts never ask for more
than the machine has. Per setting, interleaved repetitions of: Static, Dynamic (width K), Fluid HT, Fluid HA,
Fluid HA with ``--ha-deadline-ms``, and, with the slow host, Fluid on each host alone (one rank: what that
device serves at its own speed). The deadline is set once per K from the equal setting:
:data:`DEADLINE_OVER_P99` × HA's p99 there. Goals (verdicts by :func:`verdicts`): HT on uneven devices ≥ 0.9 ×
the sum of the hosts alone (the median of each repetition's ratio: :func:`paired_ratios`); HA
with the deadline, one slow host: p99 ≤ 1.5 × HA's p99 on equal devices and accuracy ≥ the fast hosts'
subset's head alone; with stalls: p99 ≤ 2 × that; on equal devices: ≥ 99 % of batches with every group and
HA's accuracy within 0.05 pp (medians over the repetitions)."""
from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..model import checkpoint, data
from ..vcluster import emulator as vcluster
from .cluster import run_on_cluster

VC_NAME = "fmuneven"
SLOW_HOST = "node2"
SLOW_SHARE = 0.25  # the slow host's CPU against the others'
# The CPU quota's period: 10 ms, so that a host at a share of the CPU is evenly slower, as a slower board
# is. At the kernel's 100 ms a host at 0.5 CPU ran 50 ms and stopped 50 ms: the coordinator's stops left
# every worker idle, and at K = 4 (0.5 CPU per host, one at 0.125) HT served 0.64 x the sum of the hosts
# alone (this bench, 3 repetitions), against 0.92 and 0.99 x at 10 ms (2 repetitions, batch 16).
PERIOD_MS = 10
STALL_S, STALL_EVERY_S = 0.2, 2.0
# the deadline against HA's p99 on equal devices: above it, so equal devices rarely miss it; well under
# the 1.5x the goal allows, so a batch answered at the deadline still meets it
DEADLINE_OVER_P99 = 1.2
BATCH = 16
RUN_S = 6.0  # each run's inputs last about this long (three stall periods)
FIRST_IMAGES = 12_000  # the first repetition's inputs (then RUN_S at its rate): seconds at batch 16 here
RUN_TIMEOUT_S = 180.0
SETTINGS = ("equal", "slow", "stall")


@dataclass
class UnevenConfig:
    out: Path
    ckpts: dict  # (family, K) -> checkpoint path
    data_dir: str | None = None
    ks: tuple[int, ...] = (2, 4)
    # 5: with 3, the HT goal's ratio at K = 4 measured 0.79 in this bench and 0.90 to 1.01 in three scratch
    # runs of the same setting (3 repetitions each): a run's luck decided it
    reps: int = 5


def _rows(k: int, ckpts: dict, deadline_ms: float, alone: bool) -> list[tuple[str, list[str], list[str] | None]]:
    """(label, infer args, hosts or None for all); ``alone``: each host alone too (the HT goal's measure)."""
    c = {f: ["-c", str(Path(ckpts[(f, k)]).resolve())] for f in ("static", "dynamic", "fluid")}
    rows = [("Static", c["static"], None), (f"Dynamic width {k}", c["dynamic"], None),
            ("Fluid HT", c["fluid"] + ["--mode", "ht"], None), ("Fluid HA", c["fluid"] + ["--mode", "ha"], None),
            (f"Fluid HA, deadline {deadline_ms:g} ms", c["fluid"] + ["--mode", "ha", "--ha-deadline-ms",
                                                                      f"{deadline_ms:g}"], None)]
    return rows + [(f"Fluid alone on node{i}", c["fluid"] + ["--mode", "ht"], [f"node{i}"])
                   for i in range(1, k + 1) if alone]


def run_order(rows: list, rep: int) -> list:
    """Repetition ``rep``'s order of ``rows`` (tuples whose first item is the label): interleaved, each
    repetition rotated by one, so that no row always runs first or after the same one. The HT goal's rows
    (Fluid HT and each host alone) run back to back, their own order rotated too: its ratio pairs runs
    seconds apart, not a minute (one host alone served 7,800 to 11,100 images/s across runs a few seconds
    apart here)."""
    def rotated(items: list) -> list:
        return items[rep % len(items):] + items[:rep % len(items)] if items else items

    ht = [r for r in rows if r[0] == "Fluid HT" or r[0].startswith("Fluid alone")]
    if len(ht) < 2:  # no host alone in this setting: every row on its own
        return rotated(rows)
    blocks = [[r] for r in rows if r not in ht]
    blocks.insert(min(i for i, r in enumerate(rows) if r in ht), rotated(ht))
    return [r for block in rotated(blocks) for r in block]


class _Staller:
    """Freezes a host for STALL_S every STALL_EVERY_S while it runs (a thread)."""

    def __init__(self, vc, host: str):
        self.vc, self.host, self.stop = vc, host, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(STALL_EVERY_S - STALL_S):
            self.vc.freeze(self.host, True)
            time.sleep(STALL_S)  # the stall itself
            self.vc.freeze(self.host, False)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.vc.freeze(self.host, False)


def run_size(n: int, n_test: int) -> list[str]:
    """infer's options for about ``n`` inputs from a test split of ``n_test``: its first ``n`` images, or whole
    passes over it, as many as come nearest to ``n``. Whole passes keep the answers' accuracy on the images
    the checkpoint's subset heads were scored on (a goal compares the two); with 10,000 test images a
    ceiling would have made 12,000 asked into 20,000 (70 s for Static with a slow host)."""
    if n <= n_test:
        return ["--limit", str(n)]
    return ["--limit", str(n_test), "--repeat", str(max(1, round(n / n_test)))]


def _one(vc, out: Path, k: int, label: str, args: list[str], hosts, n: int, n_test: int, data_args, stall: bool):
    hostfile = out / f"hosts-{'-'.join(hosts) if hosts else 'all'}"
    hostfile.write_text("".join(f"{h} slots=1\n" for h in (hosts or [f"node{i}" for i in range(1, k + 1)])))
    run_args = args + data_args + ["-b", str(BATCH)] + run_size(n, n_test)
    name = label.replace(" ", "").replace(",", "")
    staller = _Staller(vc, SLOW_HOST) if stall and (hosts is None or SLOW_HOST in hosts) else contextlib.nullcontext()
    with staller:
        rc, s, _, err = run_on_cluster(vc, len(hosts or range(k)), hostfile, run_args, out, name, RUN_TIMEOUT_S)
    return {"rc": rc, "summary": s or {}, "error": err if rc != 0 else None}


def run_k(cfg: UnevenConfig, k: int, bar) -> dict:
    """Every setting at one K; the virtual cluster is taken down at the end."""
    out = (cfg.out / f"uneven-k{k}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_args = ["--data-dir", str(Path(cfg.data_dir).resolve())] if cfg.data_dir else []
    n_test = len(data.load_split(cfg.data_dir, "test"))
    base = min(1.0, (os.cpu_count() or 1) / k)
    vc = vcluster.VCluster(os.environ.get("FLUID_MPI_BENCH_VCLUSTER") or VC_NAME)
    result: dict = {"k": k, "cpus_per_host": base, "settings": {}}
    try:
        vc.up(k, str(out / "hosts"), head=True)
        deadline_ms, sizes = None, {}
        for setting in SETTINGS:
            for i in range(1, k + 1):
                vc.slow(f"node{i}", base * (SLOW_SHARE if setting == "slow" and f"node{i}" == SLOW_HOST else 1),
                        PERIOD_MS)
            if deadline_ms is None:  # equal devices: HA's p99 sets the deadline for the run
                # as many inputs as a first repetition: at 2,000 (125 batches, a quarter second at K = 2) the
                # p99 was the start-up's slowest batch, 6.6 ms in one run and 10.3 ms in the next
                probe = _one(vc, out, k, "probe HA", ["-c", str(Path(cfg.ckpts[("fluid", k)]).resolve()), "--mode",
                                                       "ha"], None, FIRST_IMAGES, n_test, data_args, False)
                p99 = (probe["summary"].get("latency_ms") or {}).get("p99") or 10.0
                deadline_ms = math.ceil(DEADLINE_OVER_P99 * p99 * 10) / 10
                result["deadline_ms"], result["probe_p99_ms"] = deadline_ms, p99
            rows = _rows(k, cfg.ckpts, deadline_ms, alone=setting == "slow")
            got: dict = {label: [] for label, _, _ in rows}
            for rep in range(cfg.reps):
                for label, args, hosts in run_order(rows, rep):
                    bar.set_description(f"uneven K={k} {setting}: {label} ({rep + 1}/{cfg.reps})")
                    n = sizes.get((setting, label), FIRST_IMAGES)
                    r = _one(vc, out, k, label, args, hosts, n, n_test, data_args, setting == "stall")
                    rate = r["summary"].get("images_per_s") or 0
                    if rep == 0 and rate:  # later repetitions last about RUN_S
                        sizes[(setting, label)] = max(n, int(RUN_S * rate))
                    got[label].append(r)
                    bar.update(1)
            result["settings"][setting] = {label: figures(runs) for label, runs in got.items()}
    finally:
        vc.down()
    return result


def figures(runs: list[dict]) -> dict:
    """Medians over the repetitions of what each run's summary says; images/s also as its min and max, and
    per repetition (None where a run gave no figure), for the goals' paired ratios; each run's answers per
    answerer (JSON only)."""
    def median(values: list) -> float | None:
        got = [v for v in values if v is not None]
        return round(statistics.median(got), 3) if got else None

    def med(get):
        return median([get(r["summary"]) for r in runs])

    subsets: dict[str, int] = {}
    for r in runs:
        for key, n in ((r["summary"].get("ha_deadline") or {}).get("answers_by_subset") or {}).items():
            subsets[key] = subsets.get(key, 0) + n
    total = sum(subsets.values())
    per_run = [r["summary"].get("images_per_s") for r in runs]
    rates = [v for v in per_run if v is not None]
    return {"images_per_s": median(per_run),
            "images_per_s_range": [min(rates), max(rates)] if rates else None,
            "images_per_s_runs": per_run,
            # labelled answers per answerer (HT: per rank's group) in each run: which device fell short
            "answered_by_runs": [{key: v.get("answered") for key, v in (r["summary"].get("accuracy_by") or {}).items()}
                                 for r in runs],
            "p50": med(lambda s: (s.get("latency_ms") or {}).get("p50")),
            "p95": med(lambda s: (s.get("latency_ms") or {}).get("p95")),
            "p99": med(lambda s: (s.get("latency_ms") or {}).get("p99")),
            "accuracy": med(lambda s: s.get("accuracy")),
            "subset_share": {k: round(n / total, 4) for k, n in sorted(subsets.items())} if total else None,
            "ok": sum(1 for r in runs if r["rc"] == 0 and r["summary"].get("status") == "ok"), "runs": len(runs),
            "errors": [r["error"] for r in runs if r["error"]][:2]}


def verdicts(r: dict, fast_subset_accuracy: float | None) -> list[dict]:
    """The issue's goals at one K from its settings' medians: ``{"goal", "measured", "met"}`` each."""
    k, s = r["k"], r["settings"]
    ha_deadline = next(label for label in s["equal"] if label.startswith("Fluid HA, deadline"))
    ratios = paired_ratios(s["slow"], k)
    ht_ratio = statistics.median(ratios) if ratios else None
    p99_equal = s["equal"]["Fluid HA"]["p99"] or float("inf")
    slow_d, stall_d, equal_d = s["slow"][ha_deadline], s["stall"][ha_deadline], s["equal"][ha_deadline]
    every = "+".join(str(g) for g in range(k))
    share_all = (equal_d["subset_share"] or {}).get(every, 0.0)
    acc_gap = None if equal_d["accuracy"] is None or s["equal"]["Fluid HA"]["accuracy"] is None else \
        round(abs(equal_d["accuracy"] - s["equal"]["Fluid HA"]["accuracy"]), 3)
    return [
        {"goal": "HT, one slow host: ≥ 0.90 × the sum of the hosts alone",
         "measured": f"{ht_ratio:.3f} ({min(ratios):.3f}–{max(ratios):.3f}; median of {len(ratios)} repetitions' "
         "HT / sum alone)" if ratios else "no repetition with every figure", "met": bool(ratios) and ht_ratio >= 0.9},
        {"goal": "HA with the deadline, one slow host: p99 ≤ 1.5 × HA's p99 on equal devices",
         "measured": f"{slow_d['p99']} / {p99_equal} ms", "met": (slow_d["p99"] or 1e9) <= 1.5 * p99_equal},
        {"goal": "HA with the deadline, one slow host: accuracy ≥ the fast hosts' subset alone",
         "measured": f"{slow_d['accuracy']} vs {fast_subset_accuracy} %",
         "met": None if fast_subset_accuracy is None or slow_d["accuracy"] is None
         else slow_d["accuracy"] >= fast_subset_accuracy},
        {"goal": "HA with the deadline, periodic stalls: p99 ≤ 2 × HA's p99 on equal devices",
         "measured": f"{stall_d['p99']} / {p99_equal} ms (HA without: {s['stall']['Fluid HA']['p99']} ms)",
         "met": (stall_d["p99"] or 1e9) <= 2 * p99_equal},
        {"goal": "equal devices: ≥ 99 % of batches with every group, accuracy within 0.05 pp of HA",
         "measured": f"{100 * share_all:.2f} % with {every}; accuracy gap {acc_gap} pp",
         "met": share_all >= 0.99 and acc_gap is not None and acc_gap <= 0.05},
    ]


def paired_ratios(rows: dict, k: int) -> list[float]:
    """Each repetition's HT images/s over the sum of the hosts alone in the same repetition: those rows run
    back to back (:func:`run_order`), so each ratio compares runs seconds apart, not a run with the median
    of others (one host alone served from 7,800 to 12,700 images/s across runs of the same setting here).
    Repetitions with a missing figure are left out."""
    series = [rows["Fluid HT"]["images_per_s_runs"]] + \
        [rows[f"Fluid alone on node{i}"]["images_per_s_runs"] for i in range(1, k + 1)]
    return [round(ht / sum(alone), 4) for ht, *alone in zip(*series) if ht and all(alone)]


def fast_subset_accuracy(ckpt: Path, k: int) -> float | None:
    """The checkpoint's test accuracy of the head of every group but the slow host's (node2 = group 1)."""
    acc = (checkpoint.load_meta(ckpt).get("accuracy") or {}).get("subsets") or {}
    return acc.get("+".join(str(g) for g in range(k) if g != 1))


def run_uneven(cfg: UnevenConfig, bar) -> dict:
    t0 = time.time()
    results = {"runs": [], "batch": BATCH, "reps": cfg.reps, "data": data.load_split(cfg.data_dir, "test").source}
    for k in cfg.ks:
        r = run_k(cfg, k, bar)
        r["goals"] = verdicts(r, fast_subset_accuracy(cfg.ckpts[("fluid", k)], k))
        results["runs"].append(r)
    results["wall_s"] = round(time.time() - t0, 1)
    results["written"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    (cfg.out / "uneven.json").write_text(json.dumps(results, indent=1))
    return results
