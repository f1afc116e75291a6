"""``fluid-mpi bench``: the paper's comparison, measured on this machine in one run.

It is a driver, run directly (not under mpirun): it trains or reuses the three checkpoints, launches
``mpirun -np K fluid-mpi infer`` for every scenario, measures the in-process references, and writes
``results.json``, ``results.md`` and PNG plots (see ``report.py``)."""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from .model import checkpoint, data
from .mpirun import run_infer


@dataclass
class BenchConfig:
    out: Path
    data_dir: str | None = None
    parts: int = 2
    quick: bool = False
    epochs: int = 4
    kill_reps: int = 10
    rank_timeout: float = 1.0
    batch_sizes: tuple[int, ...] = (1, 64)
    limit_b1: int | None = None  # images for batch-size-1 runs (all when None)
    reps: int = 3  # throughput runs per row; the median is reported (the machines are shared and noisy)

    @classmethod
    def make(cls, out, data_dir, parts, quick) -> "BenchConfig":
        if quick:  # embedded data, tiny training, few repetitions: about two minutes
            return cls(Path(out), data_dir, parts, True, epochs=2, kill_reps=2, limit_b1=300, reps=1)
        return cls(Path(out), data_dir, parts)


def ensure_checkpoints(cfg: BenchConfig, bar) -> dict[str, Path]:
    """Train each family once per (data, K, epochs); reuse the checkpoint when it matches."""
    from .model.evaluate import accuracy_report
    from .model.models import Widths
    from .model.train import TrainConfig, train

    out = {}
    test = data.load_split(cfg.data_dir, "test")
    train_ds = None
    for family in ("static", "dynamic", "fluid"):
        path = cfg.out / "checkpoints" / f"{family}-k{cfg.parts}.pt"
        bar.set_description(f"checkpoint {family}")
        try:
            meta = checkpoint.load_meta(path)
            if meta["train"]["epochs"] == cfg.epochs and meta.get("test_data") == test.source:
                out[family] = path
                continue
        except Exception:  # missing or stale: train anew
            pass
        train_ds = train_ds or data.load_split(cfg.data_dir, "train")
        tcfg = TrainConfig(family, cfg.parts, Widths(), cfg.epochs)
        model, log = train(tcfg, train_ds, progress=False)
        meta = {"family": family, "parts": cfg.parts, "widths": tcfg.widths.as_dict(), "train": tcfg.as_dict(),
                "log": log, "accuracy": accuracy_report(model, family, test), "test_data": test.source}
        checkpoint.save_checkpoint(path, model, meta)
        out[family] = path
    return out


def reference_throughput(ckpts: dict[str, Path], cfg: BenchConfig, batch: int) -> dict:
    """In-process images/s with one thread: the whole Static model (one device), and one Fluid
    sub-network (group 0 + its head); the limit is K times the latter."""
    import torch

    torch.set_num_threads(1)
    test = data.load_split(cfg.data_dir, "test").take(cfg.limit_b1 if batch == 1 else None)
    x = data.to_tensor_batch(test.images)
    static, _ = checkpoint.load_checkpoint(ckpts["static"])
    part, _ = checkpoint.load_part(ckpts["fluid"], 0)

    def rate(fn):
        with torch.no_grad():
            fn(x[:batch])
            t0 = time.perf_counter()
            for i in range(0, len(x), batch):
                fn(x[i:i + batch])
            return len(x) / (time.perf_counter() - t0)

    one = rate(part.logits)
    return {"static_single_process": round(rate(static), 1), "fluid_subnetwork": round(one, 1),
            "limit": round(cfg.parts * one, 1)}


def throughput_scenarios(ckpts, k) -> list[tuple[str, str, list[str]]]:
    return [("static", "split", ["-c", str(ckpts["static"])]),
            ("dynamic", f"width {k}", ["-c", str(ckpts["dynamic"])]),
            ("dynamic", "width 1", ["-c", str(ckpts["dynamic"]), "--width", "1"]),
            ("fluid", "HA", ["-c", str(ckpts["fluid"]), "--mode", "ha"]),
            ("fluid", "HT", ["-c", str(ckpts["fluid"]), "--mode", "ht"])]


def after_failure(summary: dict, preds: list[dict]) -> dict:
    """Throughput and accuracy of what was answered after the first failure was detected."""
    if not summary or not summary.get("failures") or summary["failures"][0].get("at_s") is None:
        return {}
    at = summary["failures"][0]["at_s"]
    timeline = summary["timeline"]
    before = sum(n for t, n in timeline if t <= at)
    after = [(t, n) for t, n in timeline if t > at]
    out = {"images_before": before, "images_after": sum(n for _, n in after)}
    if after:
        span = max(after[-1][0] - at, 1e-6)
        out["images_per_s_after"] = round(out["images_after"] / span, 1)
        out["images_per_s_before"] = round(before / max(at, 1e-6), 1)
    late = preds[before:]
    if late:
        out["accuracy_after"] = round(100.0 * sum(p["pred"] == p["label"] for p in late) / len(late), 2)
    return out


def run_bench(cfg: BenchConfig) -> dict:
    """Every measurement; returns (and writes) the results dict."""
    k, runs = cfg.parts, cfg.out / "runs"
    data_args = ["--data-dir", str(cfg.data_dir)] if cfg.data_dir else []
    t_start = time.perf_counter()
    results: dict = {"config": {**asdict(cfg), "out": str(cfg.out)}, "throughput": [], "failures": [],
                     "detection": {}}
    n_fail = 4 * k
    total = 3 + len(cfg.batch_sizes) * (1 + 5 * cfg.reps) + n_fail + 2 * cfg.kill_reps
    with tqdm(total=total, desc="bench", unit="step") as bar:
        ckpts = ensure_checkpoints(cfg, bar)
        bar.update(3)
        results["accuracy"] = {f: checkpoint.load_meta(p)["accuracy"] for f, p in ckpts.items()}
        results["data"] = checkpoint.load_meta(ckpts["fluid"])["test_data"]
        n_images = len(data.load_split(cfg.data_dir, "test"))
        for b in cfg.batch_sizes:
            limit = ["--limit", str(cfg.limit_b1)] if b == 1 and cfg.limit_b1 else []
            bar.set_description(f"reference b={b}")
            results.setdefault("reference", {})[str(b)] = reference_throughput(ckpts, cfg, b)
            bar.update(1)
            for family, variant, args in throughput_scenarios(ckpts, k):
                rates, s = [], {}
                for rep in range(cfg.reps):
                    bar.set_description(f"{family} {variant} b={b} ({rep + 1}/{cfg.reps})")
                    name = f"tp-{family}-{variant}-b{b}".replace(" ", "")
                    s = run_infer(k, args + data_args + ["-b", str(b)] + limit, runs, name).summary or {}
                    rates.append(s.get("images_per_s") or 0.0)
                    bar.update(1)
                results["throughput"].append({"family": family, "variant": variant, "batch": b,
                                              "images_per_s": statistics.median(rates), "runs": rates,
                                              "accuracy": s.get("accuracy"), "images": s.get("answered"),
                                              "status": s.get("status")})
        for family, variant, args in throughput_scenarios(ckpts, k):
            if variant == "width 1":
                continue
            for victim in range(k):
                bar.set_description(f"kill rank {victim}: {family} {variant}")
                name = f"fail-{family}-{variant}-r{victim}".replace(" ", "")
                r = run_infer(k, args + data_args + ["--kill-rank", str(victim), "-b", "64"], runs, name,
                              timeout=30)
                s = r.summary or {}
                entry = {"family": family, "variant": variant, "victim": victim, "returncode": r.returncode,
                         "status": s.get("status", "stopped (coordinator lost)"),
                         "continued": bool(s) and s.get("status") == "ok",
                         "answered": len(r.predictions), "images": s.get("images", n_images),
                         "accuracy": s.get("accuracy"),
                         "detected_ms": (s.get("failures") or [{}])[0].get("detected_ms"),
                         "takeover": s.get("takeover"), "message": s.get("message", r.stderr.strip()[-200:])}
                entry.update(after_failure(s, r.predictions))
                results["failures"].append(entry)
                if victim == 1 and family == "fluid":
                    results.setdefault("timelines", {})[variant] = {
                        "timeline": s.get("timeline", []),
                        "failure_at_s": (s.get("failures") or [{}])[0].get("at_s")}
                bar.update(1)
        for how in ("kill", "hang"):
            times = []
            for rep in range(cfg.kill_reps):
                bar.set_description(f"detection {how} {rep + 1}/{cfg.kill_reps}")
                args = ["-c", str(ckpts["fluid"]), "--mode", "ht", "--kill-rank", "1", "--kill-how", how,
                        "--rank-timeout", str(cfg.rank_timeout), "--limit", "3000"] + data_args
                r = run_infer(k, args, runs, f"detect-{how}", timeout=60)
                f = ((r.summary or {}).get("failures") or [{}])[0]
                if f.get("detected_ms") is not None:
                    times.append(f["detected_ms"])
                bar.update(1)
            results["detection"][how] = {"median_ms": statistics.median(times) if times else None,
                                         "min_ms": min(times, default=None), "max_ms": max(times, default=None),
                                         "runs": len(times)}
    results["ratios"] = ratios(results)
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    from .report import write_report

    write_report(results, cfg.out)
    return results


def ratios(results: dict) -> dict:
    """The paper's claims, from this run's figures."""
    out = {}
    for b in {str(t["batch"]) for t in results["throughput"]}:
        tp = {(t["family"], t["variant"]): t["images_per_s"] or 0 for t in results["throughput"]
              if str(t["batch"]) == b}
        ht = tp.get(("fluid", "HT"), 0)
        k = results["config"]["parts"]
        lim = results["reference"][b]["limit"]
        out[b] = {"fluid_ht_over_static": round(ht / max(tp.get(("static", "split"), 0), 1e-9), 2),
                  "fluid_ht_over_dynamic": round(ht / max(tp.get(("dynamic", f"width {k}"), 0), 1e-9), 2),
                  "fluid_ht_over_dynamic_best": round(ht / max([v for (f, _), v in tp.items() if f == "dynamic"]
                                                               + [1e-9]), 2),
                  "fluid_ht_over_limit": round(ht / max(lim, 1e-9), 2)}
    acc = results["accuracy"]
    out["fluid_ha_minus_static_pp"] = round(acc["fluid"]["full"] - acc["static"]["full"], 2)
    return out

