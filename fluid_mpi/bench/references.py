"""Throughput and latency rows of ``fluid-mpi bench``, measured in interleaved repetitions.

Every repetition measures, for every batch size, the in-process references (one torch thread, in this
process) and then one ``mpirun`` per scenario, round-robin (the first scenario rotates from one repetition
to the next): so every row's runs are spread over the whole bench instead of coming 5 in a row, and every
ratio pairs figures measured minutes apart at most. Each mpirun presents about ``window_s`` seconds of
inputs: in the first repetition at the speed of its in-process reference (MPI is slower, so at least that
long), in the later ones at the speed the first repetition measured (a loaded machine does not stretch
them). A row is the median of the repetitions, with min and max; the paper's claims are also computed per
repetition (HT and its baselines of the same repetition), and their minimum is reported."""
from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path

from ..model import checkpoint, data
from ..cluster.mpirun import mpirun_infer

# (family, variant, ranks, extra infer args, reference that sizes its runs); "HA on one rank" is -np 1:
# plan_layout then runs group 0 alone (a subset of the K groups), with its own head
HA_ONE = "HA on one rank"
# The concurrent reference runs at least 1 s: with 0.4 s windows (the other references') two processes
# gave 1.46-2.21x one alone at batch 64, with 1-3 s windows 1.86-2.07x (9 tries); each try
# also spends ~2 s starting its processes (torch, checkpoint, data), so the 15 of a full bench add ~45 s.
CONCURRENT_WINDOW_S = 1.0


def scenarios(ckpts: dict[str, Path], k: int) -> list[tuple[str, str, int, list[str], str]]:
    st, dy, fl = (["-c", str(ckpts[f])] for f in ("static", "dynamic", "fluid"))
    return [("static", "split", k, st, "static_single_process"),
            ("dynamic", f"width {k}", k, dy, "static_single_process"),
            ("dynamic", "width 1", k, dy + ["--width", "1"], "fluid_subnetwork"),
            ("fluid", "HT", k, fl + ["--mode", "ht"], "limit"),
            ("fluid", "HA", k, fl + ["--mode", "ha"], "ha_limit"),
            ("fluid", HA_ONE, 1, fl + ["--mode", "ha"], "fluid_subnetwork")]


def _cycle(fn, x, batch: int, window_s: float, start=None) -> tuple[list[float], float]:
    """Call ``fn`` on batches of ``batch`` cycling over ``x`` for at least ``window_s`` seconds, after one
    untimed first call (set-up) and ``start()`` if given; returns each call's seconds and the wall time."""
    import torch

    calls = []
    with torch.inference_mode():
        fn(x[:batch])  # first-call set-up
        if start is not None:
            start()
        i, t_start = 0, time.perf_counter()
        while True:
            if i + batch > len(x):
                i = 0
            t0 = time.perf_counter()
            fn(x[i:i + batch])
            calls.append(time.perf_counter() - t0)
            i += batch
            if time.perf_counter() - t_start >= window_s:
                return calls, time.perf_counter() - t_start


def _shape(spec) -> tuple[int, int, int]:
    return (spec.channels, spec.height, spec.width)


def _subnetwork_loop(ckpt: str, data_dir: str | None, batch: int, window_s: float, ready, out) -> None:
    """One of :meth:`References.concurrent`'s processes: group 0's logits on batches of ``batch`` for
    ``window_s`` seconds, started with the others (``ready``, a barrier); puts its images/s in ``out``."""
    import torch

    from ..runtime.memory import tune_allocator

    torch.set_num_threads(1)
    tune_allocator()
    part, _ = checkpoint.load_part(ckpt, 0)
    x = part.spec.to_tensor(data.load_split(data_dir, "test", shape=_shape(part.spec)).images)
    calls, wall = _cycle(part.logits, x, batch, window_s, ready.wait)
    out.put(batch * len(calls) / wall)


class References:
    """The in-process references, one thread: one Fluid sub-network's logits (the HT limit is K times
    it), the HA limit (one sub-network's features + the combined head: the K groups compute side by
    side), the whole Static model, and the whole Fluid model (its per-batch latency). Beside them, the
    machine's ceiling: K processes running one sub-network each at once (:meth:`concurrent`)."""

    def __init__(self, ckpts: dict[str, Path], k: int, data_dir: str | None):
        import torch

        from ..runtime.memory import tune_allocator

        torch.set_num_threads(1)
        tune_allocator()  # as every rank does (runtime/infer.py), so both allocate alike
        self.k, self.ckpt, self.data_dir = k, str(ckpts["fluid"]), data_dir
        self.static, _ = checkpoint.load_checkpoint(ckpts["static"])
        self.fluid, _ = checkpoint.load_checkpoint(ckpts["fluid"])
        spec = self.fluid.spec
        self.x = spec.to_tensor(data.load_split(data_dir, "test", shape=_shape(spec)).images)
        self.part, _ = checkpoint.load_part(ckpts["fluid"], 0)  # group 0 with the head bank, as rank 0 has it
        self.combined = self.part.bank.head(range(k))

    def _run(self, fn, batch: int, window_s: float) -> tuple[float, float]:
        """(images/s, median ms per call) of ``fn`` on batches of ``batch``, cycling over the test set
        for at least ``window_s`` seconds."""
        calls, _ = _cycle(fn, self.x, batch, window_s)
        return batch * len(calls) / sum(calls), 1000 * statistics.median(calls)

    def concurrent(self, batch: int, window_s: float) -> float:
        """Images/s of K processes (no MPI), each running one sub-network at once for at least
        :data:`CONCURRENT_WINDOW_S`: what the cores give together, shared caches and memory included. On the
        project's 2-core machine two gave 1.46-2.21x one alone at batch 64 (9 tries, 2026-11-30; the VM's
        speed varies from second to second), so the limit (K x one alone) is within reach of the machine."""
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter each: no fork of this torch process
        ready, out = ctx.Barrier(self.k), ctx.Queue()
        window_s = max(window_s, CONCURRENT_WINDOW_S)
        procs = [ctx.Process(target=_subnetwork_loop, args=(self.ckpt, self.data_dir, batch, window_s, ready, out))
                 for _ in range(self.k)]
        for p in procs:
            p.start()
        try:
            # start-up (torch import, checkpoint, data) takes a few seconds; the window itself window_s
            return round(sum(out.get(timeout=window_s + 120) for _ in procs), 1)
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()

    def measure(self, batch: int, window_s: float) -> dict:
        import torch

        k, part = self.k, self.part
        one, _ = self._run(part.logits, batch, window_s)
        ha, _ = self._run(lambda x: self.combined(torch.cat([part.features(x)] * k, 1)), batch, window_s)
        static, static_ms = self._run(self.static, batch, window_s)
        _, fluid_ms = self._run(self.fluid, batch, window_s)
        return {"static_single_process": round(static, 1), "fluid_subnetwork": round(one, 1),
                "limit": round(k * one, 1), "ha_limit": round(ha, 1),
                "concurrent_limit": self.concurrent(batch, window_s),
                "static_latency_ms": round(static_ms, 3), "fluid_whole_latency_ms": round(fluid_ms, 3)}


def size_args(images: int, n: int) -> list[str]:
    """``--limit``/``--repeat`` that present about ``images`` inputs from a test set of ``n``."""
    repeat = max(1, math.ceil(images / n))
    return ["--limit", str(min(n, math.ceil(images / repeat)))] + (["--repeat", str(repeat)] if repeat > 1 else [])


def measure(cfg, ckpts: dict[str, Path], runs: Path, data_args: list[str], bar, timeout: float) -> dict:
    """Every throughput run and reference, interleaved; returns ``throughput``, ``reference``,
    ``reference_runs`` and ``per_rep`` for the results."""
    k, refs = cfg.parts, References(ckpts, cfg.parts, cfg.data_dir)
    n_test, scen = len(refs.x), scenarios(ckpts, cfg.parts)
    images: dict = {}  # (batch, family, variant) -> inputs per run (first repetition, then the later ones)
    samples: dict = {}  # (batch, family, variant) -> [(summary, returncode)] in repetition order
    ref_runs: dict = {str(b): [] for b in cfg.batch_sizes}
    load = []  # the machine's 1-minute load average at each step: other users' runs share the cores
    for rep in range(cfg.reps):
        for b in cfg.batch_sizes:
            load.append(round(os.getloadavg()[0], 2))
            bar.set_description(f"references b={b} ({rep + 1}/{cfg.reps})")
            ref = refs.measure(b, cfg.ref_window_s)
            ref_runs[str(b)].append(ref)
            bar.update(1)
            start = rep % len(scen)
            for family, variant, np_, args, sized_by in scen[start:] + scen[:start]:
                key = (b, family, variant)
                if key not in images:  # first repetition: about window_s at its in-process reference's speed
                    want = cfg.window_s * ref[sized_by]
                    images[key] = max(4 * b, min(cfg.max_images, b * math.ceil(want / b)))
                bar.set_description(f"{family} {variant} b={b} ({rep + 1}/{cfg.reps})")
                name = f"tp-{family}-{variant}-b{b}".replace(" ", "")
                r = mpirun_infer(np_, args + data_args + ["-b", str(b)] + size_args(images[key], n_test), runs, name,
                                 timeout=timeout)
                samples.setdefault(key, []).append((r.summary or {}, r.returncode))
                rate = (r.summary or {}).get("images_per_s")
                if rep == 0 and rate:  # later repetitions: about window_s at the speed this run measured
                    images[key] = max(4 * b, min(cfg.max_images, b * math.ceil(cfg.window_s * rate / b)))
                bar.update(1)
    rows = [_row(b, fam, var, np_, samples[(b, fam, var)]) for b in cfg.batch_sizes for fam, var, np_, _, _ in scen]
    reference = {b: {key: round(statistics.median(r[key] for r in rs), 3) for key in rs[0]}
                 for b, rs in ref_runs.items()}
    return {"throughput": rows, "reference": reference, "reference_runs": ref_runs,
            "per_rep": per_rep(rows, ref_runs, k), "load_avg": load}


def _row(b: int, family: str, variant: str, np_: int, got: list[tuple[dict, int | None]]) -> dict:
    rates = [s.get("images_per_s") or 0.0 for s, _ in got]
    lat = [s.get("latency_ms") or {} for s, _ in got]
    status = [s.get("status", "no summary") for s, _ in got]
    return {"family": family, "variant": variant, "ranks": np_, "batch": b,
            "images_per_s": statistics.median(rates), "min": min(rates), "max": max(rates), "runs": rates,
            "returncodes": [rc for _, rc in got],
            "latency_ms": {p: _median([x.get(p) for x in lat]) for p in ("p50", "p95", "p99")},
            "elapsed_s": _median([s.get("elapsed_s") for s, _ in got]),
            "accuracy": got[-1][0].get("accuracy"), "images": got[-1][0].get("answered"),
            "images_runs": [s.get("answered") for s, _ in got],
            "status": next((s for s in status if s != "ok"), "ok")}


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def per_rep(rows: list[dict], ref_runs: dict, k: int) -> dict:
    """Per batch, the ratios of each repetition (HT against its baselines and references of the same
    repetition)."""
    out = {}
    for b, refs in ref_runs.items():
        tp = {(t["family"], t["variant"]): t["runs"] for t in rows if str(t["batch"]) == b}
        ht, static = tp[("fluid", "HT")], tp[("static", "split")]
        dyn_best = [max(a, c) for a, c in zip(tp[("dynamic", f"width {k}")], tp[("dynamic", "width 1")])]
        out[b] = {"fluid_ht_over_static": [_ratio(h, s) for h, s in zip(ht, static)],
                  "fluid_ht_over_dynamic_best": [_ratio(h, d) for h, d in zip(ht, dyn_best)],
                  "fluid_ht_over_limit": [_ratio(h, r["limit"]) for h, r in zip(ht, refs)],
                  "fluid_ht_over_concurrent": [_ratio(h, r["concurrent_limit"]) for h, r in zip(ht, refs)],
                  "fluid_ha_over_limit": [_ratio(h, r["ha_limit"]) for h, r in zip(tp[("fluid", "HA")], refs)],
                  "fluid_ha_k_over_one": [_ratio(h, o) for h, o in zip(tp[("fluid", "HA")], tp[("fluid", HA_ONE)])]}
    return out


def _ratio(a: float | None, b: float | None) -> float:
    return round((a or 0) / max(b or 0, 1e-9), 3)


def ratios(results: dict) -> dict:
    """The paper's claims and the issue's goals, from this run's figures (3 decimals, so that a verdict
    never rests on rounding): ratios of the medians, and the minimum over the repetitions (``*_min``)."""
    out, k = {}, results["config"]["parts"]
    for b, ref in results["reference"].items():
        tp = {(t["family"], t["variant"]): t for t in results["throughput"] if str(t["batch"]) == b}
        rate = {key: t["images_per_s"] for key, t in tp.items()}
        ht, ha = rate[("fluid", "HT")], rate[("fluid", "HA")]
        q = out[b] = {"fluid_ht_over_static": _ratio(ht, rate[("static", "split")]),
                      "fluid_ht_over_dynamic": _ratio(ht, rate[("dynamic", f"width {k}")]),
                      "fluid_ht_over_dynamic_best": _ratio(ht, max(v for (f, _), v in rate.items() if f == "dynamic")),
                      "fluid_ht_over_limit": _ratio(ht, ref["limit"]),
                      "fluid_ht_over_concurrent": _ratio(ht, ref["concurrent_limit"]),
                      "fluid_ha_over_limit": _ratio(ha, ref["ha_limit"]),
                      "fluid_ha_k_over_one": _ratio(ha, rate[("fluid", HA_ONE)])}
        for key, values in results.get("per_rep", {}).get(b, {}).items():
            q[f"{key}_min"] = min(values)
        # the same model (all K groups, the same accuracy) on one core: HA's speed-up from K devices
        whole = int(b) * 1000.0 / ref["fluid_whole_latency_ms"] if ref.get("fluid_whole_latency_ms") else None
        q["fluid_ha_over_whole_model"] = _ratio(ha, whole)
        p50 = tp[("fluid", "HA")]["latency_ms"]["p50"]
        q["fluid_ha_p50_over_whole_model"] = None if p50 is None else _ratio(p50, ref["fluid_whole_latency_ms"])
    acc = results["accuracy"]
    out["fluid_ha_minus_static_pp"] = round(acc["fluid"]["full"] - acc["static"]["full"], 2)
    return out
