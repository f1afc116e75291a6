"""``fluid-mpi bench accuracy``: the goals' verdicts against hand-written figures, the equal-cost widths,
and one quick end-to-end run (structure: every model's row, costs from cost.py, the checkpoint cache)."""
from __future__ import annotations

import json

import pytest

from fluid_mpi.bench.accuracy import equal_cost_widths, fluid_row, verdicts
from fluid_mpi.model.cost import PRESETS, device_cost
from fluid_mpi.model.models import Widths


def _fluid(ha, groups, by_size):
    return {"ha": ha, "groups": groups, "by_size": by_size}


def test_verdicts_at_just_below_and_beyond_each_goal():
    at = _fluid(99.0, [98.5, 97.5], {"1": 98.0, "2": 99.0})
    assert verdicts(at, 99.2, 2) == {"ha_vs_static": True, "groups_even": True, "ensemble_gain": True,
                                     "non_decreasing": True}
    below = _fluid(98.99, [98.5, 97.49], {"1": 98.0, "2": 97.9})
    assert verdicts(below, 99.2, 2) == {"ha_vs_static": False, "groups_even": False, "ensemble_gain": False,
                                        "non_decreasing": False}
    k4 = _fluid(99.36, [98.65, 98.53, 98.9, 98.71], {"1": 98.7, "2": 99.19, "3": 99.32, "4": 99.36})
    assert verdicts(k4, 99.40, 4)["ensemble_gain"] is False  # +0.46 < 1.0
    assert verdicts(k4, 99.40, 4)["ha_vs_static"] is True
    k8 = verdicts(k4, 99.40, 8)  # no HA goals at K = 8
    assert k8["ha_vs_static"] is None and k8["ensemble_gain"] is None


def test_fluid_row_means_over_seeds():
    metas = [{"parts": 2, "accuracy": {"full": 99.13, "ht_mix": 98.44, "subsets": {"0": 98.41, "1": 98.46},
                                        "by_size": {"1": 98.44, "2": 99.13}}},
             {"parts": 2, "accuracy": {"full": 99.07, "ht_mix": 98.34, "subsets": {"0": 98.39, "1": 98.29},
                                        "by_size": {"1": 98.34, "2": 99.07}}}]
    row = fluid_row(metas)
    assert row["ha"] == 99.1 and row["ha_seeds"] == [99.13, 99.07]
    assert row["groups"] == [98.4, 98.38] and row["by_size"] == {"1": 98.39, "2": 99.1}


@pytest.mark.parametrize("k, expected", [(2, Widths(2, 8, 16)), (4, Widths(2, 14, 28))])
def test_equal_cost_widths_are_the_ones_chosen_by_hand(k, expected):
    w = equal_cost_widths(PRESETS["tiny"], k)
    assert w == expected
    static, fluid = device_cost("static", PRESETS["tiny"], k)["macs"], device_cost("fluid", w, k)["macs"]
    assert abs(fluid - static) / static < 0.05


def test_quick_run_writes_every_row_and_reuses_checkpoints(tmp_path):
    from click.testing import CliRunner

    from fluid_mpi.cli import cli

    args = ["bench", "accuracy", "--quick", "--out", str(tmp_path)]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    r = json.loads((tmp_path / "accuracy.json").read_text())
    assert len(r["log"]) == 4  # static, dynamic, fluid, fluid at equal cost trained
    (row,) = r["rows"]
    assert (row["preset"], row["k"]) == ("tiny", 2)
    for fam, base, w in [("static", "static", PRESETS["tiny"]), ("fluid", "fluid", PRESETS["tiny"]),
                         ("fluid-eq", "fluid", Widths(2, 8, 16))]:
        cost = row[fam]["cost"]
        assert cost["macs"] == device_cost(base, w, 2)["macs"] and cost["ms_b1"] > 0
    assert row["replicated"]["accuracy"] == row["fluid"]["ha"]
    assert set(row["fluid"]["goals"]) == {"ha_vs_static", "groups_even", "ensemble_gain", "non_decreasing"}
    md = (tmp_path / "accuracy.md").read_text()
    assert "### tiny, K = 2 (seeds 0)" in md and "replication" in md
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and json.loads((tmp_path / "accuracy.json").read_text())["log"] == []
    (tmp_path / "checkpoints" / "dynamic-tiny-k2-s0.pt").unlink()
    cached = CliRunner().invoke(cli, args + ["--no-train"])
    assert cached.exit_code == 0, cached.output
    r = json.loads((tmp_path / "accuracy.json").read_text())
    assert r["log"] == [] and r["rows"][0]["missing"] == ["dynamic"] and "dynamic" not in r["rows"][0]
    assert "Not trained (`--no-train`): Dynamic." in (tmp_path / "accuracy.md").read_text()
    two = CliRunner().invoke(cli, args + ["--no-train", "--seeds", "0,1"])  # only seed 0 is in the cache
    assert two.exit_code == 0, two.output
    row = json.loads((tmp_path / "accuracy.json").read_text())["rows"][0]
    assert row["seeds"] == [0, 1] and row["missing"] == ["dynamic"]
    assert row["static"]["only_seeds"] == [0] and len(row["fluid"]["ha_seeds"]) == 1
    assert "(seed 0 only)" in (tmp_path / "accuracy.md").read_text()


def test_fluid_widths_add_a_judged_row_and_bad_widths_are_refused(tmp_path):
    from click.testing import CliRunner

    from fluid_mpi.cli import cli

    args = ["bench", "accuracy", "--quick", "--out", str(tmp_path), "--fluid-widths", "2,6,12"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    (row,) = json.loads((tmp_path / "accuracy.json").read_text())["rows"]
    sweep = row["fluid-2,6,12"]
    assert sweep["cost"]["macs"] == device_cost("fluid", Widths(2, 6, 12), 2)["macs"]
    assert set(sweep["goals"]) == {"ha_vs_static", "groups_even", "ensemble_gain", "non_decreasing"}
    assert (tmp_path / "checkpoints" / "fluid-2_6_12-k2-s0.pt").exists()
    md = (tmp_path / "accuracy.md").read_text()
    assert "| Fluid at 2,6,12 | 2,6,12 |" in md and "- **Fluid at 2,6,12**: each group alone" in md
    assert "K=2 fluid-2,6,12: HA" in res.output
    (tmp_path / "checkpoints" / "fluid-2_6_12-k2-s0.pt").unlink()
    cached = CliRunner().invoke(cli, args + ["--no-train"])
    assert cached.exit_code == 0, cached.output
    assert json.loads((tmp_path / "accuracy.json").read_text())["rows"][0]["missing"] == ["fluid-2,6,12"]
    assert "Not trained (`--no-train`): Fluid at 2,6,12." in (tmp_path / "accuracy.md").read_text()
    for bad in ("2,6", "2,0,12", "a,b,c"):
        res = CliRunner().invoke(cli, ["bench", "accuracy", "--quick", "--out", str(tmp_path), "--fluid-widths", bad])
        assert res.exit_code == 2 and "--fluid-widths" in res.output and "Traceback" not in res.output
