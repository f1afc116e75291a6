"""``fluid-mpi bench adaptive``: HA, HT and ``--mode auto`` under an offered load (issue 11, section 4).

A driver, run directly (not under mpirun). It trains or reuses the checkpoints (``bench.ensure_checkpoints``),
measures HT's capacity with a closed-loop HT run, sweeps the offered load (a Poisson stream, ``infer --rate``)
from 10 % to 120 % of that capacity running HA, HT and auto interleaved at every load, runs one step load
(low -> high -> low) in auto mode, and writes OUT/adaptive.json, OUT/adaptive.md and OUT/img/adaptive-*.png
(``report_adaptive.py``). Every run at one load and repetition replays the same arrivals (same ``--seed``).
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from .throughput import BenchConfig, ensure_checkpoints, environment
from .references import size_args
from ..model import data
from ..cluster.mpirun import mpirun_infer
from ..runtime.arrivals import parse_rate, schedule_offsets

MODES = ("ha", "ht", "auto")
# Hard limit of one mpirun (mpirun_infer kills its process group then). A sweep run presents run_s (<= 3 s)
# of inputs; at 120 % of HT's capacity HA (measured at 1/3 to 1/8 of HT's) answers them in up to 10 x run_s
# (30 s), plus start-up (~7 s for two ranks importing torch on a busy 2-core machine): ~40 s; 120 s leaves
# room for a loaded machine and still stops a hang.
RUN_TIMEOUT_S = 120.0
# The closed-loop capacity run is at most ~3 s of work; same start-up and margin as above.
CAPACITY_TIMEOUT_S = 120.0
# Wall-time goal of `bench adaptive --quick` (tests/test_bench_adaptive.py asserts it): the whole command
# measured 192 s (training the three quick checkpoints, ~45 s, included) on the project's 2-core machine on
# 2026-11-30 while other test suites ran (132 s later, at load average ~3); x 1.5 of the slower run for a
# shared, noisy machine gives 290 s. (Since then only the fluid checkpoint is trained: the budget only got looser.)
QUICK_BUDGET_S = 290.0
# Width of the step-load timeline's windows: 100 ms, short next to each 1-2 s step, long enough to hold a few batches.
WINDOW_S = 0.1


@dataclass
class AdaptiveConfig:
    """What the sweep measures. ``loads``: offered load as fractions of HT's measured capacity;
    ``latency_ms``: the target given to every run (only auto acts on it; the latency goal checks it)."""

    out: Path
    data_dir: str | None = None
    parts: int = 2
    quick: bool = False
    loads: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9, 1.05, 1.2)
    # interleaved repetitions per (load, mode), the median reported: 5, the bench's rule for ratios (issue 10);
    # with 3, one slow HT or auto run of the shared machine moved the overload verdict (docs/adaptive.md)
    reps: int = 5
    run_s: float = 3.0  # each sweep run offers about this many seconds of arrivals
    capacity_s: float = 2.5  # the closed-loop HT capacity run lasts at least 2 s (sized to ~this)
    # the --latency-ms target: 100 ms. The goal needs loads where HT alone meets it; on the 2026-11-30 sweep
    # (docs/adaptive-results.md, load 0.7-1.8) HT's p99 was 54-95 ms from 10 % to 90 % load (one ~100 ms
    # stall of a shared core in a 3 s run sets a p99) and 127-502 ms above: 50 ms qualified no load.
    latency_ms: float = 100.0
    batch_size: int = 64  # infer's default
    step: tuple[float, float, float] = (0.1, 1.1, 0.1)  # step load: fractions of HT's capacity, low/high/low
    step_s: float = 2.0  # seconds of each step segment
    seed: int = 1  # repetition r uses seed + r
    recheck: bool = True  # re-measure HT's capacity after every repetition (the machine is shared: it drifts)

    @classmethod
    def make(cls, out, data_dir, parts: int, quick: bool) -> "AdaptiveConfig":
        """The full sweep, or the quick one (3 loads, one repetition, shorter runs; QUICK_BUDGET_S)."""
        if quick:
            return cls(Path(out), data_dir, parts, True, loads=(0.1, 0.5, 1.2), reps=1, run_s=1.5,
                       capacity_s=2.2, step_s=1.0, recheck=False)
        return cls(Path(out), data_dir, parts)

    def command(self) -> str:
        """The command line that reproduces this run."""
        return " ".join(["fluid-mpi bench adaptive"] + (["--quick"] if self.quick else [])
                        + (["--data-dir", str(self.data_dir)] if self.data_dir else [])
                        + ["--parts", str(self.parts), "--out", str(self.out)])


def sizing(n: int, n_test: int) -> tuple[list[str], int]:
    """``references.size_args`` (``--limit``/``--repeat`` for about ``n`` inputs) and how many they give."""
    args = size_args(n, n_test)
    repeat = int(args[3]) if len(args) > 2 else 1
    return args, int(args[1]) * repeat


class Runner:
    """Launches the runs of one bench and condenses each into a row of figures."""

    def __init__(self, cfg: AdaptiveConfig, ckpt: Path, n_test: int):
        self.cfg, self.ckpt, self.n_test = cfg, ckpt, n_test
        self.runs = cfg.out / "runs-adaptive"
        self.data_args = ["--data-dir", str(cfg.data_dir)] if cfg.data_dir else []

    def run(self, mode: str, name: str, n: int, rate: str | None, seed: int, timeout: float,
            keep: bool = False) -> dict:
        """One ``mpirun infer`` of about ``n`` inputs at ``rate`` (None: closed loop); its row
        (``keep``: also the raw predictions, events and timeline, for the step-load plot)."""
        size, count = sizing(n, self.n_test)
        args = ["-c", str(self.ckpt), "--mode", mode, "-b", str(self.cfg.batch_size),
                "--latency-ms", f"{self.cfg.latency_ms:g}", "--seed", str(seed)] + size + self.data_args
        args += ["--rate", rate] if rate else []
        load_avg = round(os.getloadavg()[0], 2)  # 1-min load average at launch: how busy the shared machine was
        r = mpirun_infer(self.cfg.parts, args, self.runs, name, timeout=timeout)
        s = r.summary or {}
        offsets = schedule_offsets(count, parse_rate(rate), seed) if rate else None
        keys = sorted(p.get("index", -1) for p in r.predictions)
        row = {"mode": mode, "rate": rate, "seed": seed, "images": count, "returncode": r.returncode,
               "exit_code": s.get("exit_code"), "answered": len(r.predictions),
               "exactly_once": keys == list(range(count)),
               # the realized Poisson rate of this seed's arrivals (the nominal rate +- 1/sqrt(n))
               "offered_per_s": round(count / float(offsets[-1]), 1) if offsets is not None else None,
               "images_per_s": s.get("images_per_s"), "elapsed_s": s.get("elapsed_s"),
               "latency_ms": s.get("latency_ms") or {}, "accuracy": s.get("accuracy"),
               "max_backlog": s.get("max_backlog"), "by_mode": s.get("by_mode") or {},
               "switches": sum(e.get("event") == "mode_switch" for e in r.events), "wall_s": round(r.seconds, 1),
               "policy_ha_capacity": policy_ha_capacity(r.events),
               "policy_ha_capacity_last": policy_ha_capacity(r.events, last=True), "load_avg": load_avg}
        if r.returncode != 0 or s.get("exit_code") != 0:
            row["error"] = (s.get("message") or r.stderr.strip()[-300:] or "no summary")
        if keep:
            row["windows"] = step_windows(s.get("timeline", []), r.predictions, r.events, offsets)
        return row

    def capacity(self, bar) -> dict:
        """HT's capacity: a closed-loop HT run (no --rate) sized to last ``capacity_s``; re-sized and run
        again (at most twice) while it lasts under 2 s."""
        # first guess: above the fastest HT capacity seen on the project's 2-core machine (~8,600/s), so the
        # first run usually lasts >= 2 s (a re-run costs a whole mpirun start-up, ~8 s)
        guess, row = 10_000.0, {}
        for attempt in range(3):
            bar.set_description(f"HT capacity (run {attempt + 1})")
            row = self.run("ht", f"capacity-{attempt}", int(guess * self.cfg.capacity_s), None, 0, CAPACITY_TIMEOUT_S)
            if not row.get("images_per_s"):
                raise RuntimeError(f"the HT capacity run failed: {row.get('error')}")
            if row["elapsed_s"] >= 2.0:
                break
            guess = row["images_per_s"] * 1.1  # a little more than measured: the next run lasts >= 2 s
        bar.update(1)
        return row


def policy_ha_capacity(events: list[dict], last: bool = False) -> float | None:
    """The auto policy's HA capacity (images/s): at start, from the start-up probe's ``capacity`` event
    (else the first ``mode_switch`` reason naming it, "... x 3825.7/s"); with ``last``, the live estimate
    at the end (the run's last ``capacity`` event, else the last ``mode_switch`` reason naming one). None
    when no event names it."""
    import re

    found = [float(m.group(1)) for e in events if e.get("event") == "mode_switch"
             for m in [re.search(r"x (?:HA capacity )?([\d.]+)/s", e.get("reason", ""))] if m]
    if last:
        end = [e["ha_per_s"] for e in events if e.get("event") == "capacity" and e.get("at") == "end"]
        return end[-1] if end else (found[-1] if found else None)
    probed = [e["ha_per_s"] for e in events if e.get("event") == "capacity" and e.get("probed")]
    return probed[0] if probed else (found[0] if found else None)


def step_windows(timeline: list, preds: list[dict], events: list[dict], offsets, width_s: float = WINDOW_S) -> dict:
    """The step load's timeline in ``width_s`` windows: inputs offered, answered in HA and in HT, and the
    time of each mode switch (the answer time of batch ``after_batch``: the decision came right after it).
    The summary's timeline has one (seconds, images) entry per answered batch, in the order of the
    prediction lines, so each batch's mode is that of its first line. Its clock starts when the predictions
    file is opened, a few tens of ms before the first arrival (the offsets' zero)."""
    import numpy as np

    modes, pos = [], 0
    for _, n in timeline:
        modes.append(preds[pos].get("mode") if pos < len(preds) else None)
        pos += n
    end = max([t for t, _ in timeline] + [float(offsets[-1]) if len(offsets) else 0.0])
    edges = np.arange(0.0, end + width_s, width_s)
    out = {"width_s": width_s, "t": [round(float(e), 3) for e in edges[:-1]],
           "offered": np.histogram(offsets, edges)[0].tolist()}
    for m in ("ha", "ht"):
        ts = [t for (t, _), mode in zip(timeline, modes) if mode == m]
        ns = [n for (_, n), mode in zip(timeline, modes) if mode == m]
        out[m] = np.histogram(ts, edges, weights=ns)[0].astype(int).tolist() if ts else [0] * (len(edges) - 1)
    out["switches"] = [{"t": timeline[e["after_batch"] - 1][0] if 0 < e.get("after_batch", 0) <= len(timeline)
                        else 0.0, **{k: e.get(k) for k in ("mode", "was", "backlog", "arrival_rate", "reason",
                                                           "after_batch")}}
                       for e in events if e.get("event") == "mode_switch"]
    return out


def median(rows: list[dict], get) -> float | None:
    """The median of ``get(row)`` over the rows where it is known."""
    vals = [v for v in (get(r) for r in rows) if v is not None]
    return round(statistics.median(vals), 3) if vals else None


def condense(rows: list[dict]) -> dict:
    """Median figures of one (load, mode) over its repetitions."""
    return {"images_per_s": median(rows, lambda r: r["images_per_s"]),
            "offered_per_s": median(rows, lambda r: r["offered_per_s"]),
            "p50_ms": median(rows, lambda r: r["latency_ms"].get("p50")),
            "p99_ms": median(rows, lambda r: r["latency_ms"].get("p99")),
            "accuracy": median(rows, lambda r: r["accuracy"]),
            "max_backlog": median(rows, lambda r: r["max_backlog"]),
            "ha_share": median(rows, lambda r: (r["by_mode"].get("ha", 0) / max(1, sum(r["by_mode"].values())))),
            "switches": median(rows, lambda r: r["switches"]),
            "policy_ha_capacity": median(rows, lambda r: r.get("policy_ha_capacity")),
            "policy_ha_capacity_last": median(rows, lambda r: r.get("policy_ha_capacity_last")),
            "all_ok": all(r["returncode"] == 0 and r["exit_code"] == 0 and r["exactly_once"] for r in rows),
            "reps": rows}


def run_adaptive(cfg: AdaptiveConfig) -> dict:
    """Every measurement of ``bench adaptive``; writes (and returns) OUT/adaptive.json and the report."""
    t_start = time.perf_counter()
    runs_total = len(cfg.loads) * cfg.reps * len(MODES)
    with tqdm(total=3 + 1 + runs_total + (cfg.reps if cfg.recheck else 0) + 1, desc="bench adaptive", unit="run") as bar:
        bcfg = BenchConfig.make(cfg.out, cfg.data_dir, cfg.parts, cfg.quick)
        ckpts = ensure_checkpoints(bcfg, bar, ("fluid",))  # HA, HT and auto are all the fluid family's
        bar.update(3)
        n_test = len(data.load_split(cfg.data_dir, "test"))
        runner = Runner(cfg, ckpts["fluid"], n_test)
        cap_row = runner.capacity(bar)
        cap = float(cap_row["images_per_s"])
        raw: dict[tuple[int, str], list[dict]] = {}
        checks: list[float | None] = []  # HT's closed-loop capacity after each repetition (cfg.recheck)
        for rep in range(cfg.reps):
            order = MODES[rep % 3:] + MODES[:rep % 3]  # rotate, so no mode always runs first
            for i, frac in enumerate(cfg.loads):
                rate = round(frac * cap, 1)
                for mode in order:
                    bar.set_description(f"rep {rep + 1}/{cfg.reps}: {frac:.0%} load, {mode}")
                    row = runner.run(mode, f"sweep-{i}-{mode}", int(rate * cfg.run_s), f"{rate:g}", cfg.seed + rep,
                                     RUN_TIMEOUT_S)
                    raw.setdefault((i, mode), []).append(row)
                    bar.update(1)
            if cfg.recheck:
                bar.set_description(f"rep {rep + 1}/{cfg.reps}: HT capacity again")
                again = runner.run("ht", f"capacity-check-{rep}", int(cap * cfg.capacity_s), None, 0,
                                   CAPACITY_TIMEOUT_S)
                checks.append(again["images_per_s"])
                bar.update(1)
        bar.set_description("step load (auto)")
        lo, hi, lo2 = (round(f * cap, 1) for f in cfg.step)
        spec = f"{lo:g}@{cfg.step_s:g},{hi:g}@{cfg.step_s:g},{lo2:g}"
        step = runner.run("auto", "step-auto", int((lo + hi + lo2) * cfg.step_s), spec, cfg.seed, RUN_TIMEOUT_S,
                          keep=True)
        step.update(spec=spec, segments_s=cfg.step_s, fractions=list(cfg.step))
        bar.update(1)
    points = [{"load": frac, "rate": round(frac * cap, 1),
               "modes": {m: condense(raw[(i, m)]) for m in MODES}} for i, frac in enumerate(cfg.loads)]
    env = environment(BenchConfig.make(cfg.out, cfg.data_dir, cfg.parts, cfg.quick))
    env["command"] = cfg.command()
    results = {"config": {**asdict(cfg), "out": str(cfg.out)}, "environment": env,
               "data": data.load_split(cfg.data_dir, "test").source,
               "checkpoint_accuracy": json.loads(json.dumps(_accuracy(ckpts["fluid"]))),
               "ht_capacity": {"images_per_s": cap, "run": cap_row, "after_each_rep": checks},
               "load_avg": [min(loads), max(loads)] if (loads := [row["load_avg"] for rows in raw.values()
                                                                  for row in rows]) else None,
               "points": points, "step": step,
               "budget_s": QUICK_BUDGET_S if cfg.quick else None}
    from .report_adaptive import write_report

    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    write_report(results, cfg.out)
    return results


def _accuracy(ckpt: Path) -> dict:
    """The checkpoint's own evaluation (HA head and each group), for the report."""
    from ..model import checkpoint

    return checkpoint.load_meta(ckpt).get("accuracy", {})


def publish_adaptive(out: Path, dest: Path) -> None:
    """Copy OUT/adaptive.md, adaptive.json and img/adaptive-*.png into ``dest`` (e.g. docs/) as
    adaptive-results.md, adaptive-results.json and img/ (the same relative image paths)."""
    out, dest = Path(out), Path(dest)
    (dest / "img").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "adaptive.md", dest / "adaptive-results.md")
    shutil.copyfile(out / "adaptive.json", dest / "adaptive-results.json")
    for png in sorted((out / "img").glob("adaptive-*.png")):
        shutil.copyfile(png, dest / "img" / png.name)
