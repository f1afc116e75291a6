"""`fluid-mpi bench`: the report's verdicts against hand-made figures with known answers (at the goal,
just below it, not measured), and `bench --quick` (and `bench cluster --quick` where network namespaces
are allowed) end to end, checked for structure: keys, units, ordering and ranges of their figures, the
exit code of every mpirun they launched, and the interleaving. Speeds themselves are not asserted (the
machines are shared; the timing goals live in the bench's own goals table), nor is the wall time of a
run: the only time bounds are the hard limits that the configuration gives each mpirun and pytest's
timeout (pyproject.toml)."""
import json
import math
import os
import statistics
import subprocess

import pytest
from click.testing import CliRunner
from conftest import namespaces_refused

from fluid_mpi.bench.cluster import QUICK_SETTINGS
from fluid_mpi.bench.references import size_args
from fluid_mpi.cli import cli
from fluid_mpi.bench.report import goals, verdict
from fluid_mpi.bench.report_cluster import cluster_lines
from fluid_mpi.runtime.liveness import recovery_deadline

pytestmark = pytest.mark.mpi

MET, NOT_MEASURED = "✔ met", "— not measured"


def test_verdict_at_just_below_and_without_the_goal():
    # at least the target
    assert verdict(0.9, 0.9) == MET  # exactly at the goal
    assert verdict(0.95, 0.9) == MET
    assert verdict(0.8999, 0.9) == "✘ not met (short by 0.0001)"  # just below
    assert verdict(0.0, 0.9) == "✘ not met (short by 0.9)"
    assert verdict(None, 0.9) == NOT_MEASURED
    # at most the target
    assert verdict(200, 200, at_most=True) == MET  # exactly at the goal
    assert verdict(150, 200, at_most=True) == MET
    assert verdict(200.5, 200, at_most=True) == "✘ not met (short by 0.5)"  # just over
    assert verdict(None, 200, at_most=True) == NOT_MEASURED


def _hand_made_results() -> dict:
    """A results dict with every figure the goals read, each placed at, just below or without its goal."""
    return {
        "config": {"parts": 2, "quick": True},
        "ratios": {
            "64": {"fluid_ht_over_limit": 0.9, "fluid_ht_over_limit_min": 0.85,  # at 0.9: met
                   "fluid_ha_over_limit": 0.7999, "fluid_ha_over_limit_min": 0.7,  # just below 0.8
                   "fluid_ha_over_whole_model": 1.0,  # at 1.0: met
                   "fluid_ht_over_static": 3.1, "fluid_ht_over_static_min": 2.5,  # min at 2.5: met
                   "fluid_ht_over_dynamic_best": 2.2, "fluid_ht_over_dynamic_best_min": 1.99},  # min below 2.0
            "1": {"fluid_ht_over_limit": 0.74,  # just below 0.75 (no *_min: shown as —)
                  "fluid_ht_over_static": 2.6,  # no per-repetition minimum: not measured
                  "fluid_ht_over_dynamic_best": 2.4, "fluid_ht_over_dynamic_best_min": 2.0,  # at 2.0: met
                  "fluid_ha_p50_over_whole_model": 1.3},  # at most 1.3, exactly: met
        },
        "reference": {"1": {"fluid_whole_latency_ms": 0.5}, "64": {"fluid_subnetwork": 1000.0}},
        "failures": [
            {"family": "static", "variant": "split", "victim": 1, "images_per_s_after": 5000.0},  # not Fluid
            {"family": "fluid", "variant": "HT", "victim": 0, "images_per_s_after": 5000.0},  # a take-over
            {"family": "fluid", "variant": "HT", "victim": 1, "images_per_s_after": 900.0},  # 0.9 x 1000: met
            {"family": "fluid", "variant": "HA", "victim": 1, "images_per_s_after": None},  # not measured
        ],
        "budget_s": 120.0, "wall_s": 120.0,  # at the budget: met
        "cluster": {"budget_s": 75.0, "wall_s": 75.1, "quick": True},  # just over its budget
    }


# (words of the goal, value, target, at_most, verdict), written by hand from the figures above
EXPECTED_GOALS = [
    ("Fluid HT ≥ 0.9 × limit (2 × one sub-network in-process), batch 64", 0.9, 0.9, False, MET),
    ("Fluid HT ≥ 0.75 × limit (2 × one sub-network in-process), batch 1", 0.74, 0.75, False,
     "✘ not met (short by 0.01)"),
    ("Fluid HA ≥ 0.8 × HA limit", 0.7999, 0.8, False, "✘ not met (short by 0.0001)"),
    ("Fluid HA ≥ 1.0 × the whole Fluid model in-process (same accuracy), batch 64", 1.0, 1.0, False, MET),
    ("Fluid HT ≥ 2.5 × Static in every repetition, batch 64", 2.5, 2.5, False, MET),
    ("Fluid HT ≥ 2.0 × Dynamic's best width in every repetition, batch 64", 1.99, 2.0, False,
     "✘ not met (short by 0.01)"),
    ("Fluid HT ≥ 2.5 × Static in every repetition, batch 1", None, 2.5, False, NOT_MEASURED),
    ("Fluid HT ≥ 2.0 × Dynamic's best width in every repetition, batch 1", 2.0, 2.0, False, MET),
    ("Fluid HA p50 latency ≤ 1.3 × the whole Fluid model's in-process latency, batch 1", 1.3, 1.3, True, MET),
    ("Fluid HT, rank 1 killed: images/s after the failure ≥ 0.9 × one sub-network", 0.9, 0.9, False, MET),
    ("Fluid HA, rank 1 killed: images/s after the failure ≥ 0.9 × one sub-network", None, 0.9, False,
     NOT_MEASURED),
    ("`bench --quick` takes ≤ 120 s", 120.0, 120.0, True, MET),
    ("`bench cluster --quick` takes ≤ 75 s (its own budget)", 75.1, 75.0, True, "✘ not met (short by 0.1)"),
]


def test_goals_of_hand_made_figures():
    got = goals(_hand_made_results())
    assert len(got) == len(EXPECTED_GOALS), [g["goal"] for g in got]  # no goal for Static nor a take-over
    for words, value, target, at_most, expected in EXPECTED_GOALS:
        (g,) = [g for g in got if g["goal"].startswith(words)] or [None]
        assert g is not None, f"no goal {words!r} in {[g['goal'] for g in got]}"
        assert (g["value"], g["target"], g["at_most"], g["verdict"]) == (value, target, at_most, expected), g


def test_goals_without_batch_1_or_a_cluster():
    """Missing data: no batch-1 ratios, no reference sub-network speed, no budget, no cluster: only the
    batch-64 goals, none of them invented."""
    r = _hand_made_results()
    del r["ratios"]["1"], r["reference"]["64"]["fluid_subnetwork"], r["budget_s"], r["cluster"]
    got = {g["goal"]: g["verdict"] for g in goals(r)}
    assert len(got) == 5 and all(goal.endswith("batch 64") or "batch 64" in goal for goal in got), got
    assert not any("killed" in goal or "takes" in goal or "batch 1" in goal for goal in got), got


def test_size_args_present_about_the_asked_number_of_inputs():
    assert size_args(640, 10_000) == ["--limit", "640"]
    assert size_args(25_000, 10_000) == ["--limit", "8334", "--repeat", "3"]  # 25,002 inputs
    assert size_args(10_000, 1_000) == ["--limit", "1000", "--repeat", "10"]


def test_cluster_section_says_where_the_figures_come_from():
    row = {"images_per_s": 100.0, "min": 90.0, "max": 110.0, "bytes_per_image": 1040.0}
    rows = [dict(row, family=f, variant=v) for f, v in (("static", "split"), ("dynamic", "width 2"),
                                                        ("dynamic", "width 1"), ("fluid", "HT"), ("fluid", "HA"))]
    q = {"fluid_ht_over_static": 3.0, "fluid_ht_over_dynamic_best": 2.0, "fluid_ht_over_static_min": 2.9,
         "fluid_ht_over_dynamic_best_min": 1.9}
    c = {"batch": 64, "reps": 3, "probe_images": 4000, "window_s": 2.5, "wall_s": 1.0,
         "settings": [{"link": "100 Mbit/s", "rate": "100mbit", "cpus": 0.25, "rows": rows, "ratios": q}]}
    md = "\n".join(cluster_lines(c))
    assert "network namespaces on one machine" in md and "netem" in md
    assert "| 100 Mbit/s | 0.25 CPU per host | 3.0× (min 2.9) | 2.0× (min 1.9) |" in md and "1,040" in md
    assert "Command:" not in md  # no provenance recorded, none invented
    dated = "\n".join(cluster_lines(dict(c, command="fluid-mpi bench cluster --out x", date="2026-11-30 12:21 UTC")))
    assert "Command: `fluid-mpi bench cluster --out x`, 2026-11-30 12:21 UTC." in dated
    assert cluster_lines(None) == []


# --------------------------------------------------------------------------------- end to end: structure


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def close(a: float, b: float, rel: float = 1e-3, abs_: float = 2e-3) -> bool:
    """Equal up to the 3 decimals the bench rounds its figures to."""
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def check_percentiles(lat: dict, elapsed_s: float, where) -> None:
    """Milliseconds, in order, and no input waited longer than the run lasted."""
    assert set(lat) == {"p50", "p95", "p99"}, where
    assert positive(lat["p50"]) and lat["p50"] <= lat["p95"] <= lat["p99"] <= 1000 * elapsed_s, (where, lat)


def check_goal_verdicts(r: dict, md: str) -> None:
    """Each verdict says what its value and target say (the rule written out here, not the report's)."""
    assert r["goals"]
    for g in r["goals"]:
        assert set(g) == {"goal", "measured", "value", "target", "at_most", "verdict"}, g
        if g["value"] is None:
            assert g["verdict"] == NOT_MEASURED, g
        elif (g["value"] <= g["target"]) if g["at_most"] else (g["value"] >= g["target"]):
            assert g["verdict"] == MET, g
        else:
            assert g["verdict"].startswith("✘ not met (short by "), g
        assert f"| {g['goal']} | {g['measured']} | {g['verdict']} |" in md, g["goal"]


def check_throughput(r: dict, runs_dir) -> None:
    cfg, k = r["config"], r["config"]["parts"]
    reps = cfg["reps"]
    assert reps >= 2  # so that the interleaving and the per-repetition minimum are exercised
    rows = r["throughput"]
    assert [(t["family"], t["variant"], t["ranks"]) for t in rows if t["batch"] == 64] == [
        ("static", "split", k), ("dynamic", f"width {k}", k), ("dynamic", "width 1", k), ("fluid", "HT", k),
        ("fluid", "HA", k), ("fluid", "HA on one rank", 1)]
    assert [t["batch"] for t in rows] == [b for b in cfg["batch_sizes"] for _ in range(6)]  # batch by batch
    for t in rows:
        where = (t["family"], t["variant"], t["batch"])
        assert t["status"] == "ok" and t["returncodes"] == [0] * reps, t  # None: killed at its timeout
        runs = t["runs"]
        assert len(runs) == reps and all(positive(v) for v in runs), where
        assert t["min"] == min(runs) and t["max"] == max(runs), where
        assert t["images_per_s"] == statistics.median(runs) and t["min"] <= t["images_per_s"] <= t["max"], where
        assert 0 < t["accuracy"] <= 100 and positive(t["elapsed_s"]), where
        # at least 4 batches per run, and the later repetitions sized from the first's speed
        assert len(t["images_runs"]) == reps and all(n >= 4 * t["batch"] for n in t["images_runs"]), where
        check_percentiles(t["latency_ms"], max(t["elapsed_s"], 1e-9) * 2, where)
        # the last repetition's own summary (each repetition rewrites the run's files): its images/s is
        # images / elapsed seconds, and is the row's last figure
        name = f"tp-{t['family']}-{t['variant']}-b{t['batch']}".replace(" ", "")
        s = json.loads((runs_dir / f"{name}.json").read_text())
        assert s["answered"] == t["images"] == t["images_runs"][-1] and s["duplicates"] == 0, where
        assert s["images_per_s"] == runs[-1], where
        assert close(s["answered"] / s["elapsed_s"], s["images_per_s"], rel=0.01), (where, s["answered"],
                                                                                    s["elapsed_s"])
        check_percentiles(s["latency_ms"], s["elapsed_s"], where)


def check_references_and_ratios(r: dict) -> None:
    k, reps = r["config"]["parts"], r["config"]["reps"]
    for b in map(str, r["config"]["batch_sizes"]):
        ref = r["reference"][b]
        for key in ("limit", "ha_limit", "static_single_process", "fluid_subnetwork", "concurrent_limit",
                    "fluid_whole_latency_ms", "static_latency_ms"):
            assert positive(ref[key]), (b, key, ref.get(key))
        assert close(ref["limit"], k * ref["fluid_subnetwork"], abs_=0.01 * k), ref  # limit: K sub-networks
        assert len(r["reference_runs"][b]) == reps  # one reference per repetition, between the mpiruns
        for one in r["reference_runs"][b]:
            assert close(one["limit"], k * one["fluid_subnetwork"], abs_=0.01 * k), one
        assert close(ref["limit"], statistics.median(one["limit"] for one in r["reference_runs"][b])), b
        tp = {(t["family"], t["variant"]): t for t in r["throughput"] if str(t["batch"]) == b}
        ht, ha = tp[("fluid", "HT")]["images_per_s"], tp[("fluid", "HA")]["images_per_s"]
        q = r["ratios"][b]
        for key in ("fluid_ht_over_static", "fluid_ht_over_dynamic", "fluid_ht_over_dynamic_best",
                    "fluid_ht_over_limit", "fluid_ht_over_concurrent", "fluid_ha_over_limit", "fluid_ha_k_over_one",
                    "fluid_ha_over_whole_model", "fluid_ha_p50_over_whole_model"):
            assert positive(q[key]), (b, key, q.get(key))
        # the ratios are of the rows above (rounded to 3 decimals)
        assert close(q["fluid_ht_over_static"], ht / tp[("static", "split")]["images_per_s"]), b
        assert close(q["fluid_ht_over_limit"], ht / ref["limit"]), b
        assert close(q["fluid_ha_k_over_one"], ha / tp[("fluid", "HA on one rank")]["images_per_s"]), b
        best = max(tp[("dynamic", f"width {k}")]["images_per_s"], tp[("dynamic", "width 1")]["images_per_s"])
        assert close(q["fluid_ht_over_dynamic_best"], ht / best) and q["fluid_ht_over_dynamic_best"] <= \
            q["fluid_ht_over_dynamic"] + 1e-3, b
        assert set(r["per_rep"][b]) == {"fluid_ht_over_static", "fluid_ht_over_dynamic_best", "fluid_ht_over_limit",
                                        "fluid_ht_over_concurrent", "fluid_ha_over_limit", "fluid_ha_k_over_one"}
        for key, values in r["per_rep"][b].items():
            assert len(values) == reps and all(positive(v) for v in values), (b, key)
            assert q[f"{key}_min"] == min(values), (b, key)
            assert min(values) <= max(values)
        # the per-repetition HT / Static ratios pair the runs of each repetition
        pairs = [h / s for h, s in zip(tp[("fluid", "HT")]["runs"], tp[("static", "split")]["runs"])]
        assert all(close(a, p) for a, p in zip(r["per_rep"][b]["fluid_ht_over_static"], pairs)), b


def check_failures_and_detection(r: dict) -> None:
    k, cfg = r["config"]["parts"], r["config"]
    assert sorted((f["family"], f["variant"], f["victim"]) for f in r["failures"]) == sorted(
        (fam, var, v) for fam, var in (("static", "split"), ("dynamic", f"width {k}"), ("fluid", "HT"),
                                       ("fluid", "HA")) for v in range(k))
    for f in r["failures"]:
        # 0 when the run went on (None would mean killed at its timeout), 3 when it stopped after a failure
        assert f["returncode"] == (0 if f["continued"] else 3), f
        assert 0 < f["answered"] <= f["images"] and 0 <= f["accuracy"] <= 100, f
        assert isinstance(f["detected_ms"], (int, float)) and 0 <= f["detected_ms"] < 1000 * cfg["rank_timeout"], f
        if f["continued"] and f.get("images_after"):
            assert positive(f["images_per_s_after"]) and f["images_before"] + f["images_after"] <= f["answered"], f
    outcome = {(f["family"], f["variant"], f["victim"]): f["continued"] for f in r["failures"]}
    assert outcome[("static", "split", 1)] is False and outcome[("dynamic", f"width {k}", 0)] is False
    assert outcome[("dynamic", f"width {k}", 1)] and outcome[("fluid", "HT", 1)] and outcome[("fluid", "HA", 1)]
    assert set(r["detection"]) == {"kill", "hang"}
    for how, d in r["detection"].items():
        assert d["returncodes"] == [0] * cfg["kill_reps"] and d["runs"] == cfg["kill_reps"], (how, d)
        assert 0 < d["min_ms"] <= d["median_ms"] <= d["max_ms"], (how, d)
    # a death is reported (ULFM) well before the deadline that catches a hang; a hang by that deadline
    assert r["detection"]["kill"]["max_ms"] < 1000 * cfg["rank_timeout"], r["detection"]
    assert r["detection"]["hang"]["max_ms"] < 1000 * recovery_deadline(cfg["rank_timeout"]), r["detection"]


@pytest.fixture
def quick(bench_quick):
    """The session's `bench --quick` (conftest.py)."""
    return bench_quick


def test_bench_quick_outputs(quick):
    r = json.loads((quick / "results.json").read_text())
    assert {"config", "environment", "budget_s", "throughput", "failures", "detection", "accuracy", "training",
            "data", "reference", "reference_runs", "per_rep", "load_avg", "ratios", "wall_s", "goals"} <= set(r)
    assert r["config"]["quick"] is True and r["config"]["batch_sizes"] == [64, 1]
    check_throughput(r, quick / "runs")
    check_references_and_ratios(r)
    check_failures_and_detection(r)
    assert len(r["load_avg"]) == r["config"]["reps"] * len(r["config"]["batch_sizes"])
    md = (quick / "results.md").read_text()
    check_goal_verdicts(r, md)
    goal_texts = " ".join(g["goal"] for g in r["goals"])
    for text in ("Fluid HT ≥ 0.9 × limit", "Fluid HT ≥ 0.75 × limit", "Fluid HA ≥ 0.8 × HA limit",
                 "the whole Fluid model in-process (same accuracy), batch 64", "2.5 × Static in every repetition",
                 "2.0 × Dynamic's best width in every repetition", "Fluid HA p50 latency ≤ 1.3",
                 f"`bench --quick` takes ≤ {r['budget_s']:.0f} s"):
        assert text in goal_texts, text
    assert "Fluid HT / Static" in md and "One rank killed" in md and "Against the goals" in md
    assert "Per-image latency" in md and "HA limit" in md
    assert positive(r["wall_s"]) and f"Data: {r['data']}. Wall time of the whole benchmark: {r['wall_s']} s" in md
    for png in ("throughput.png", "latency.png", "accuracy.png", "timeline.png"):
        assert (quick / "img" / png).read_bytes()[:4] == b"\x89PNG" and f"](img/{png})" in md


def test_bench_cluster_quick(quick, monkeypatch):
    reason = namespaces_refused("bench cluster runs", f"b{os.getpid() % 10_000_000}p")
    if reason:
        pytest.skip(reason)
    name = f"b{os.getpid() % 10_000_000}"  # its own vcluster: never a bench running beside the tests
    monkeypatch.setenv("FLUID_MPI_BENCH_VCLUSTER", name)
    res = CliRunner().invoke(cli, ["bench", "cluster", "--quick", "--out", str(quick)])
    assert res.exit_code == 0, res.output
    assert subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.count(f"{name}-") == 0
    c = json.loads((quick / "cluster.json").read_text())
    r = json.loads((quick / "results.json").read_text())
    assert r["cluster"]["settings"] == c["settings"] and c["quick"] is True and c["reps"] == 1
    assert [(st["link"], st["rate"], st["cpus"]) for st in c["settings"]] == [tuple(s) for s in QUICK_SETTINGS]
    k = r["config"]["parts"]
    for st in c["settings"]:
        assert [(row["family"], row["variant"]) for row in st["rows"]] == [
            ("static", "split"), ("dynamic", f"width {k}"), ("dynamic", "width 1"), ("fluid", "HT"), ("fluid", "HA")]
        for row in st["rows"]:
            assert row["returncodes"] == [0] * c["reps"] and row["status"] == "ok" and not row["errors"], row
            assert len(row["runs"]) == c["reps"] and all(positive(v) for v in row["runs"]), row
            assert row["min"] <= row["images_per_s"] <= row["max"] and positive(row["images_per_s"]), row
            assert all(n > 0 for n in row["images"]), row
        tp = {row["variant"]: row for row in st["rows"]}
        q = st["ratios"]
        assert all(positive(v) for v in q.values()), q
        assert close(q["fluid_ht_over_static"], tp["HT"]["images_per_s"] / tp["split"]["images_per_s"]), q
        assert q["fluid_ht_over_static_min"] <= q["fluid_ht_over_static"] + 1e-3 or c["reps"] == 1, q
        assert tp["HA"]["bytes_per_image"] > 784  # at least every image's 28×28 bytes went to the other rank
    md = (quick / "results.md").read_text()
    assert "network namespaces on one machine" in md and "`bench cluster --quick` takes" in md
    check_goal_verdicts(json.loads((quick / "results.json").read_text()), md)
    assert positive(c["wall_s"])
