"""`fluid-mpi bench --quick`: the structure of its outputs and that its figures are positive (speeds
themselves are not asserted: the machines are shared)."""
import json

import pytest
from click.testing import CliRunner

from fluid_mpi.cli import cli
from fluid_mpi.mpirun import find_mpirun

pytestmark = pytest.mark.mpi


def test_bench_quick_outputs(tmp_path):
    if find_mpirun() is None:
        pytest.skip("no mpirun found")
    res = CliRunner().invoke(cli, ["bench", "--quick", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "results.json").read_text())
    assert {t["family"] for t in r["throughput"]} == {"static", "dynamic", "fluid"}
    assert all(t["images_per_s"] > 0 and t["status"] == "ok" for t in r["throughput"])
    assert {t["batch"] for t in r["throughput"]} == {1, 64}
    for b in ("1", "64"):
        assert r["reference"][b]["limit"] > 0 and r["reference"][b]["static_single_process"] > 0
        assert r["ratios"][b]["fluid_ht_over_static"] > 0 and r["ratios"][b]["fluid_ht_over_dynamic"] > 0
    outcome = {(f["family"], f["variant"], f["victim"]): f["continued"] for f in r["failures"]}
    assert outcome[("static", "split", 1)] is False and outcome[("dynamic", "width 2", 0)] is False
    assert outcome[("dynamic", "width 2", 1)] and outcome[("fluid", "HT", 1)] and outcome[("fluid", "HA", 1)]
    assert r["detection"]["kill"]["median_ms"] > 0 and r["detection"]["hang"]["median_ms"] > 0
    md = (tmp_path / "results.md").read_text()
    assert "Fluid HT / Static" in md and "One rank killed" in md
    for png in ("throughput.png", "accuracy.png", "timeline.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert r["wall_s"] < 240
