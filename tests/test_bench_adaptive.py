"""`fluid-mpi bench adaptive --quick`: every load point has every mode, every run answered every input
once, the verdicts follow from the figures, the plots exist, and the whole command keeps its wall-time
bound. (Speeds and the goals themselves are not asserted: the machine is shared.)"""
import json
import subprocess
import sys
import time

import pytest

from fluid_mpi.bench.adaptive import MODES, QUICK_BUDGET_S, AdaptiveConfig
from fluid_mpi.cluster.mpirun import find_mpirun
from fluid_mpi.bench.report_adaptive import PLOTS, goals, sustained

pytestmark = pytest.mark.mpi

def test_goal_verdicts_follow_the_figures():
    def point(load, ha, ht, auto):  # (images/s, p99 ms, accuracy) per mode; offered 1000/s
        return {"load": load, "rate": 1000.0, "modes": {m: {"images_per_s": v[0], "offered_per_s": 1000.0,
                                                            "p99_ms": v[1], "accuracy": v[2]}
                                                        for m, v in zip(MODES, (ha, ht, auto))}}
    low = point(0.1, (990, 30, 95.0), (990, 20, 94.0), (990, 25, 95.0))  # HA sustains; auto = HA
    over = point(1.2, (500, 900, 95.0), (1000, 45, 94.0), (940, 60, 94.0))  # 0.94 x HT; p99 over 50 ms
    assert sustained(low) and not sustained(over)
    acc, thr, lat = goals([low, over], 50.0)
    assert acc["met"] is True and acc["verdict"] == "✔ met" and [c["load"] for c in acc["checked"]] == [0.1]
    assert thr["met"] is False and thr["failing"][0]["ratio"] == 0.94
    assert lat["met"] is False and [c["load"] for c in lat["failing"]] == [1.2]
    none = goals([low], 50.0)[1]
    assert none["met"] is None and not none["verdict"].startswith("✔")


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


def test_bench_adaptive_quick(tmp_path):
    if find_mpirun() is None:
        pytest.skip("no mpirun found (install Open MPI: scripts/setup.sh does)")
    out = tmp_path / "adaptive"
    t0 = time.monotonic()
    # QUICK_BUDGET_S (measured wall time x 1.5, see fluid_mpi/bench/adaptive.py) plus 60 s: a run over the bound still ends (and fails the wall-time assert below) with its report
    res = subprocess.run([sys.executable, "-m", "fluid_mpi.cli", "bench", "adaptive", "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=QUICK_BUDGET_S + 60)
    wall = time.monotonic() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads((out / "adaptive.json").read_text())
    cfg = AdaptiveConfig.make(out, None, 2, True)
    assert [p["load"] for p in r["points"]] == list(cfg.loads)
    for p in r["points"]:
        assert sorted(p["modes"]) == sorted(MODES)
        for m in MODES:
            row = p["modes"][m]
            assert len(row["reps"]) == cfg.reps and row["all_ok"], (p["load"], m, row["reps"])
            assert row["images_per_s"] > 0 and row["p99_ms"] > 0 and row["accuracy"] > 0
            assert all(rep["mode"] == m and rep["exit_code"] == 0 and rep["exactly_once"] for rep in row["reps"])
    assert r["ht_capacity"]["run"]["elapsed_s"] >= 2.0
    assert r["goals"] == json.loads(json.dumps(goals(r["points"], cfg.latency_ms)))  # recomputed from the figures
    for g in r["goals"]:
        assert g["met"] == (not g["failing"] if g["checked"] else None)
        assert g["verdict"].startswith("✔") == (g["met"] is True)
    step = r["step"]
    assert step["mode"] == "auto" and step["exactly_once"] and step["exit_code"] == 0
    w = step["windows"]
    assert sum(w["ha"]) + sum(w["ht"]) == step["images"] and sum(w["offered"]) == step["images"]
    assert len(w["switches"]) == step["switches"]
    for name in PLOTS.values():
        assert (out / "img" / name).stat().st_size > 1000
    md = (out / "adaptive.md").read_text()
    assert all(g["verdict"] in md for g in r["goals"]) and "fluid-mpi bench adaptive --quick" in md
    assert wall <= QUICK_BUDGET_S, f"bench adaptive --quick took {wall:.0f} s (bound {QUICK_BUDGET_S:.0f} s)"
