"""`fluid-mpi bench adaptive`: the goals' verdicts against hand-made load points with known answers (at
each threshold, just past it, without data), and `bench adaptive --quick` end to end, checked for
structure: every load point has every mode, every run answered every input once, the figures have their
units, order and ranges, the verdicts agree with the figures, the plots exist. (Speeds, the goals
themselves and the command's wall time are not asserted: the machine is shared; the wall-time goal is in
the bench's own report.)"""
import json
import math
import statistics
import subprocess
import sys

import pytest

from fluid_mpi.bench.adaptive import CAPACITY_TIMEOUT_S, MODES, RUN_TIMEOUT_S, AdaptiveConfig
from conftest import seed_checkpoints
from fluid_mpi.bench.report_adaptive import PLOTS, goals, sustained

pytestmark = pytest.mark.mpi


def point(load, ha, ht, auto, offered=1000.0):
    """A hand-made load point: (images/s, p99 ms, accuracy) per mode, every mode offered ``offered``/s."""
    return {"load": load, "rate": offered, "modes": {m: {"images_per_s": v[0], "offered_per_s": offered,
                                                         "p99_ms": v[1], "accuracy": v[2]}
                                                     for m, v in zip(MODES, (ha, ht, auto))}}


def test_goal_verdicts_follow_the_figures():
    low = point(0.1, (990, 30, 95.0), (990, 20, 94.0), (990, 25, 95.0))  # HA sustains; auto = HA
    over = point(1.2, (500, 900, 95.0), (1000, 45, 94.0), (940, 60, 94.0))  # 0.94 x HT; p99 over 50 ms
    assert sustained(low) and not sustained(over)
    acc, thr, lat = goals([low, over], 50.0)
    assert acc["met"] is True and acc["verdict"] == "✔ met" and [c["load"] for c in acc["checked"]] == [0.1]
    assert thr["met"] is False and thr["failing"][0]["ratio"] == 0.94
    assert lat["met"] is False and [c["load"] for c in lat["failing"]] == [1.2]
    none = goals([low], 50.0)[1]
    assert none["met"] is None and not none["verdict"].startswith("✔")


def test_sustained_at_just_below_and_without_figures():
    """HA sustains a load when it answers at least 0.98 x the offered rate (1000/s here)."""
    assert sustained(point(0.5, (980, 1, 1), (1, 1, 1), (1, 1, 1)))  # exactly 0.98
    assert not sustained(point(0.5, (979.9, 1, 1), (1, 1, 1), (1, 1, 1)))  # just below
    assert sustained(point(0.5, (1200, 1, 1), (1, 1, 1), (1, 1, 1)))  # more than offered (a burst's tail)
    assert not sustained(point(0.5, (None, 1, 1), (1, 1, 1), (1, 1, 1)))  # HA's run gave no figure
    assert not sustained(point(0.5, (0, 1, 1), (1, 1, 1), (1, 1, 1)))
    assert not sustained(point(0.5, (990, 1, 1), (1, 1, 1), (1, 1, 1), offered=None))  # no offered rate


def test_accuracy_goal_at_just_past_and_without_the_tolerance():
    """Where HA sustains, auto's accuracy within ± 0.05 pp of HA's."""
    def at(load, auto_acc):
        return point(load, (1000, 10, 95.0), (1000, 10, 90.0), (1000, 10, auto_acc))

    acc = goals([at(0.1, 95.05), at(0.2, 94.95), at(0.3, 95.051), at(0.4, None)], 50.0)[0]
    assert [(c["load"], c["gap_pp"], c["ok"]) for c in acc["checked"]] == [
        (0.1, 0.05, True), (0.2, -0.05, True), (0.3, 0.051, False), (0.4, None, False)]
    assert [c["load"] for c in acc["failing"]] == [0.3, 0.4] and acc["met"] is False
    assert acc["verdict"] == "✘ not met"
    assert goals([at(0.1, 95.0)], 50.0)[0]["verdict"] == "✔ met"


def test_throughput_goal_at_just_below_and_without_figures():
    """Where HA does not sustain, auto's throughput >= 0.95 x HT's (without per-repetition rows: the ratio of
    the medians)."""
    def at(load, ht, auto):
        return point(load, (100, 900, 95.0), (ht, 900, 94.0), (auto, 900, 94.0))

    thr = goals([at(1.0, 1000, 950), at(1.1, 1000, 949), at(1.2, None, 900), at(1.3, 1000, None)], 50.0)[1]
    assert [(c["load"], c["ratio"], c["pairs"], c["ok"]) for c in thr["checked"]] == [
        (1.0, 0.95, [0.95], True), (1.1, 0.949, [0.949], False), (1.2, None, [], False), (1.3, None, [], False)]
    assert [c["ratio_of_medians"] for c in thr["checked"]] == [0.95, 0.949, None, None]
    assert thr["met"] is False and [c["load"] for c in thr["failing"]] == [1.1, 1.2, 1.3]
    assert goals([at(1.0, 1000, 950)], 50.0)[1]["verdict"] == "✔ met"


def test_latency_goal_at_just_past_and_without_the_target():
    """Where HT's p99 is at most the target (50 ms), auto's p99 must be too; other loads are not checked."""
    def at(load, ht_p99, auto_p99):
        return point(load, (1000, 10, 95.0), (1000, ht_p99, 94.0), (1000, auto_p99, 95.0))

    lat = goals([at(0.1, 50.0, 50.0), at(0.2, 50.0, 50.1), at(0.3, 50.1, 10.0), at(0.4, None, 10.0),
                 at(0.5, 20.0, None)], 50.0)[2]
    assert [(c["load"], c["ok"]) for c in lat["checked"]] == [(0.1, True), (0.2, False), (0.5, False)]
    assert [c["load"] for c in lat["failing"]] == [0.2, 0.5] and lat["met"] is False
    none = goals([at(0.3, 50.1, 10.0)], 50.0)[2]  # HT misses the target: no load qualifies
    assert none["checked"] == [] and none["met"] is None and none["verdict"] == "– no load qualified"


def test_throughput_goal_pairs_the_runs_of_a_repetition():
    """The overload verdict is the median of auto / HT per repetition (same seed, same arrivals), not the
    ratio of two medians that may come from different moments of the sweep."""
    def mode(*per_seed):  # images/s of repetitions with seeds 1, 2, 3
        reps = [{"seed": s, "images_per_s": v} for s, v in enumerate(per_seed, 1)]
        return {"images_per_s": sorted(per_seed)[1], "offered_per_s": 1000.0, "p99_ms": 500.0, "accuracy": 95.0,
                "reps": reps}
    # a fast HT repetition and a slow auto one: medians 1000 vs 940 (0.94), pairs 0.98, 1.0, 0.82 -> 0.98
    noisy = {"load": 1.2, "rate": 1000.0, "modes": {"ha": mode(400, 400, 400), "ht": mode(960, 1000, 1100),
                                                    "auto": mode(940, 1000, 900)}}
    thr = goals([noisy], 50.0)[1]
    assert thr["met"] is True and thr["checked"][0]["pairs"] == [0.979, 1.0, 0.818]
    assert thr["checked"][0]["ratio"] == 0.979 and thr["checked"][0]["ratio_of_medians"] == 0.94
    # a policy that costs 10 % in every pair fails whatever the medians
    slow = {"load": 1.2, "rate": 1000.0, "modes": {"ha": mode(400, 400, 400), "ht": mode(1000, 1000, 1000),
                                                   "auto": mode(900, 900, 900)}}
    thr = goals([slow], 50.0)[1]
    assert thr["met"] is False and thr["failing"][0]["ratio"] == 0.9 and thr["failing"][0]["min"] == 0.9


# --------------------------------------------------------------------------------- end to end: structure


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def check_run(rep: dict, mode: str) -> None:
    """One mpirun's row: exit 0, every input once, images/s = answered / elapsed s, percentiles in order."""
    assert rep["mode"] == mode and rep["returncode"] == 0 and rep["exit_code"] == 0, rep
    assert rep["exactly_once"] and rep["answered"] == rep["images"] > 0, rep
    assert positive(rep["elapsed_s"]) and positive(rep["images_per_s"]), rep
    assert math.isclose(rep["answered"] / rep["elapsed_s"], rep["images_per_s"], rel_tol=0.01), rep
    lat = rep["latency_ms"]
    assert positive(lat["p50"]) and lat["p50"] <= lat["p95"] <= lat["p99"] <= 1000 * rep["elapsed_s"], rep
    assert 0 < rep["accuracy"] <= 100, rep
    if mode in ("ha", "ht"):  # a fixed mode runs every batch in it
        other = "ht" if mode == "ha" else "ha"
        assert rep["by_mode"].get(other, 0) == 0 and rep["by_mode"].get(mode, 0) > 0 and rep["switches"] == 0, rep


def check_verdicts(g: dict, points: dict, latency_ms: float) -> None:
    """A goal's verdict agrees with its checked loads, and those with the figures of the table."""
    assert g["met"] == (not g["failing"] if g["checked"] else None), g
    assert g["verdict"] == {True: "✔ met", False: "✘ not met", None: "– no load qualified"}[g["met"]], g
    assert all(c in g["checked"] for c in g["failing"]) and all(not c["ok"] for c in g["failing"]), g
    assert all(c["ok"] for c in g["checked"] if c not in g["failing"]), g
    for c in g["checked"]:
        m = points[c["load"]]["modes"]
        if g["goal"].startswith("accuracy"):
            assert (c["ha"], c["auto"]) == (m["ha"]["accuracy"], m["auto"]["accuracy"]), c
            assert c["ok"] == (abs(c["auto"] - c["ha"]) <= 0.05 + 1e-9), c
        elif g["goal"].startswith("throughput"):
            assert (c["ht"], c["auto"]) == (m["ht"]["images_per_s"], m["auto"]["images_per_s"]), c
            assert c["ok"] == (c["ratio"] >= 0.95) and c["min"] <= c["ratio"] <= c["max"], c
        else:
            assert c["ht"] == m["ht"]["p99_ms"] <= latency_ms, c
            assert c["ok"] == (c["auto"] <= latency_ms), c


def quick_hard_bound_s(cfg: AdaptiveConfig) -> float:
    """The longest `bench adaptive --quick` can take by its configuration: every mpirun it launches cut at
    its hard limit (up to 3 capacity runs, the sweep, the capacity re-checks, the step load), plus one more
    run's limit for training the checkpoint and drawing the plots. Not a measurement: a hang guard."""
    runs = len(cfg.loads) * cfg.reps * len(MODES) + 1
    checks = 3 + (cfg.reps if cfg.recheck else 0)
    return runs * RUN_TIMEOUT_S + checks * CAPACITY_TIMEOUT_S + RUN_TIMEOUT_S


QUICK_CFG = AdaptiveConfig.make("unused", None, 2, True)


@pytest.mark.timeout(quick_hard_bound_s(QUICK_CFG) + 60)
def test_bench_adaptive_quick(tmp_path, bench_quick):
    """From the session bench's Fluid checkpoint (same data and epochs: reused, not trained again)."""
    out = tmp_path / "adaptive"
    seed_checkpoints(bench_quick, out)
    res = subprocess.run([sys.executable, "-m", "fluid_mpi.cli", "bench", "adaptive", "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=quick_hard_bound_s(QUICK_CFG))
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads((out / "adaptive.json").read_text())
    cfg = AdaptiveConfig.make(out, None, 2, True)
    assert r["config"]["loads"] == list(cfg.loads) and r["config"]["reps"] == cfg.reps
    cap = r["ht_capacity"]
    check_run(cap["run"], "ht")
    assert cap["run"]["elapsed_s"] >= 2.0 and cap["images_per_s"] == cap["run"]["images_per_s"]
    assert [p["load"] for p in r["points"]] == list(cfg.loads)
    assert [p["rate"] for p in r["points"]] == [round(x * cap["images_per_s"], 1) for x in cfg.loads]
    for p in r["points"]:
        assert sorted(p["modes"]) == sorted(MODES)
        offered = {p["modes"][m]["offered_per_s"] for m in MODES}
        assert len(offered) == 1 and math.isclose(offered.pop(), p["rate"], rel_tol=0.1), p  # same arrivals
        for m in MODES:
            row = p["modes"][m]
            assert len(row["reps"]) == cfg.reps and row["all_ok"], (p["load"], m, row["reps"])
            assert [rep["seed"] for rep in row["reps"]] == [cfg.seed + i for i in range(cfg.reps)]
            for rep in row["reps"]:
                check_run(rep, m)
                assert rep["rate"] == f"{p['rate']:g}", rep
            assert row["images_per_s"] == round(statistics.median(rep["images_per_s"] for rep in row["reps"]), 3)
            assert min(rep["images_per_s"] for rep in row["reps"]) <= row["images_per_s"] <= \
                max(rep["images_per_s"] for rep in row["reps"])
            assert 0 < row["p50_ms"] <= row["p99_ms"] and 0 < row["accuracy"] <= 100 and 0 <= row["ha_share"] <= 1
            # nothing is answered faster than it arrives (the last answers may trail the last arrival)
            assert row["images_per_s"] <= 1.05 * row["offered_per_s"], (p["load"], m, row)
        assert p["modes"]["ha"]["ha_share"] == 1 and p["modes"]["ht"]["ha_share"] == 0
    by_load = {p["load"]: p for p in r["points"]}
    assert [g["goal"] for g in r["goals"]] == ["accuracy where HA keeps up", "throughput at overload",
                                                "latency where HT meets the target"]
    for g in r["goals"]:
        check_verdicts(g, by_load, cfg.latency_ms)
    # every load is either one HA sustains (accuracy goal) or an overload (throughput goal), never both
    acc_loads = [c["load"] for c in r["goals"][0]["checked"]]
    thr_loads = [c["load"] for c in r["goals"][1]["checked"]]
    assert sorted(acc_loads + thr_loads) == sorted(cfg.loads), (acc_loads, thr_loads)
    for x in acc_loads:
        ha = by_load[x]["modes"]["ha"]
        assert ha["images_per_s"] >= 0.98 * ha["offered_per_s"], (x, ha)
    for x in thr_loads:
        ha = by_load[x]["modes"]["ha"]
        assert ha["images_per_s"] < 0.98 * ha["offered_per_s"], (x, ha)
    step = r["step"]
    check_run(step, "auto")
    w = step["windows"]
    assert sum(w["ha"]) + sum(w["ht"]) == step["images"] and sum(w["offered"]) == step["images"]
    assert len(w["t"]) == len(w["offered"]) == len(w["ha"]) == len(w["ht"]) and w["width_s"] == 0.1
    assert all(math.isclose(b - a, w["width_s"], abs_tol=1e-3) for a, b in zip(w["t"], w["t"][1:]))
    assert len(w["switches"]) == step["switches"]
    assert [s["t"] for s in w["switches"]] == sorted(s["t"] for s in w["switches"])
    assert all(s["was"] != s["mode"] or i == 0 for i, s in enumerate(w["switches"])), w["switches"]
    for name in PLOTS.values():
        assert (out / "img" / name).read_bytes()[:4] == b"\x89PNG"
    md = (out / "adaptive.md").read_text()
    assert all(g["verdict"] in md for g in r["goals"]) and "fluid-mpi bench adaptive --quick" in md
    assert positive(r["wall_s"]) and f"Wall time {r['wall_s']} s" in md
