"""`fluid-mpi bench --quick`: the structure of its outputs, that its figures are positive (speeds
themselves are not asserted: the machines are shared), the exit code of every mpirun it launched, the
verdicts of the report, and its wall time."""
import json

import pytest
from click.testing import CliRunner

from fluid_mpi.bench import QUICK_BUDGET_S
from fluid_mpi.cli import cli
from fluid_mpi.mpirun import find_mpirun
from fluid_mpi.report import verdict

pytestmark = pytest.mark.mpi


def test_verdict_is_met_only_when_the_figure_meets_the_goal():
    assert verdict(0.9, 0.9) == "✔ met" and verdict(0.95, 0.9) == "✔ met"
    assert verdict(0.89, 0.9).startswith("✘") and verdict(0.899, 0.9).startswith("✘")
    assert verdict(150, 200, at_most=True) == "✔ met" and verdict(201, 200, at_most=True).startswith("✘")
    assert verdict(None, 0.9).startswith("—")


def test_bench_quick_outputs(tmp_path):
    if find_mpirun() is None:
        pytest.skip("no mpirun found")
    res = CliRunner().invoke(cli, ["bench", "--quick", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "results.json").read_text())
    assert {t["family"] for t in r["throughput"]} == {"static", "dynamic", "fluid"}
    assert all(t["images_per_s"] > 0 and t["status"] == "ok" for t in r["throughput"])
    assert {t["batch"] for t in r["throughput"]} == {1, 64}
    # every mpirun the bench launched: 0 when the run went on (None would mean killed at its timeout),
    # 3 when it stopped after a failure
    assert all(t["returncodes"] == [0] * r["config"]["reps"] for t in r["throughput"]), r["throughput"]
    assert all(f["returncode"] == (0 if f["continued"] else 3) for f in r["failures"]), r["failures"]
    assert all(d["returncodes"] == [0] * r["config"]["kill_reps"] for d in r["detection"].values())
    for b in ("1", "64"):
        assert r["reference"][b]["limit"] > 0 and r["reference"][b]["static_single_process"] > 0
        assert r["ratios"][b]["fluid_ht_over_static"] > 0 and r["ratios"][b]["fluid_ht_over_dynamic"] > 0
    outcome = {(f["family"], f["variant"], f["victim"]): f["continued"] for f in r["failures"]}
    assert outcome[("static", "split", 1)] is False and outcome[("dynamic", "width 2", 0)] is False
    assert outcome[("dynamic", "width 2", 1)] and outcome[("fluid", "HT", 1)] and outcome[("fluid", "HA", 1)]
    assert r["detection"]["kill"]["median_ms"] > 0 and r["detection"]["hang"]["median_ms"] > 0
    assert r["goals"] and all(g["verdict"] == verdict(g["value"], g["target"], g["at_most"])
                              for g in r["goals"])
    md = (tmp_path / "results.md").read_text()
    assert "Fluid HT / Static" in md and "One rank killed" in md and "Against the goals" in md
    assert f"Data: {r['data']}. Wall time of the whole benchmark: {r['wall_s']} s" in md
    for png in ("throughput.png", "accuracy.png", "timeline.png"):
        assert (tmp_path / "img" / png).read_bytes()[:4] == b"\x89PNG" and f"](img/{png})" in md
    # measured 184 s here (see fluid_mpi/bench.py); the bound is that × 1.5, as the README and help say
    assert r["wall_s"] < QUICK_BUDGET_S
