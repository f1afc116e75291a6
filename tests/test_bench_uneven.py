"""``fluid-mpi bench uneven``'s goals, judged from hand-written medians (at, just past and without each goal);
the bench itself runs on the virtual cluster (its command and result are in docs/uneven-results.md)."""
from __future__ import annotations

import copy

from fluid_mpi.bench.uneven import figures, paired_ratios, run_order, run_size, verdicts


def _f(ips=None, p99=None, acc=None, share=None):
    runs = list(ips) if isinstance(ips, (list, tuple)) else [ips] * 3  # per repetition
    return {"images_per_s": runs[1], "images_per_s_runs": runs, "p50": None, "p95": None, "p99": p99, "accuracy": acc,
            "subset_share": share}


def _run(ht=900.0, alone=(600.0, 400.0), slow_p99=15.0, stall_p99=20.0, equal_share=0.99, acc_gap=0.05):
    d = "Fluid HA, deadline 12 ms"
    settings = {}
    for name in ("equal", "slow", "stall"):
        settings[name] = {"Fluid HT": _f(ht), "Fluid HA": _f(p99=10.0, acc=99.0),
                          d: _f(p99=10.0, acc=99.0, share={"0+1": 1.0})}
    settings["slow"].update({f"Fluid alone on node{i + 1}": _f(a) for i, a in enumerate(alone)})  # slow only
    settings["slow"][d] = _f(p99=slow_p99, acc=98.5, share={"0": 0.9, "0+1": 0.1})
    settings["stall"][d] = _f(p99=stall_p99, acc=98.9, share={"0": 0.1, "0+1": 0.9})
    settings["equal"][d] = _f(p99=10.0, acc=round(99.0 - acc_gap, 3), share={"0": 1 - equal_share, "0+1": equal_share})
    return {"k": 2, "settings": settings}


def _met(run, fast=98.5):
    return [g["met"] for g in verdicts(run, fast)]


def test_every_goal_at_its_bound_is_met():
    assert _met(_run()) == [True, True, True, True, True]


def test_just_past_each_bound_is_not_met():
    assert _met(_run(ht=899.9)) == [False, True, True, True, True]
    assert _met(_run(slow_p99=15.01)) == [True, False, True, True, True]
    assert _met(_run(), fast=98.51) == [True, True, False, True, True]
    assert _met(_run(stall_p99=20.01)) == [True, True, True, False, True]
    assert _met(_run(equal_share=0.989)) == [True, True, True, True, False]
    assert _met(_run(acc_gap=0.06)) == [True, True, True, True, False]


def test_missing_figures_are_not_met_or_unknown():
    run = copy.deepcopy(_run())
    run["settings"]["slow"]["Fluid HA, deadline 12 ms"]["accuracy"] = None
    run["settings"]["slow"]["Fluid HA, deadline 12 ms"]["p99"] = None
    assert _met(run) == [True, False, None, True, True]


def test_the_ht_goal_is_the_median_of_each_repetitions_ratio():
    """Paired by repetition: the second repetition's slow run of node1 alone is set against that
    repetition's HT, not against the median HT."""
    run = _run(ht=[1000.0, 800.0, 900.0], alone=([700.0, 500.0, 650.0], 400.0))
    assert paired_ratios(run["settings"]["slow"], 2) == [round(1000 / 1100, 4), round(800 / 900, 4),
                                                         round(900 / 1050, 4)]
    goal = verdicts(run, 98.5)[0]
    assert goal["met"] is False
    assert goal["measured"].startswith(f"{800 / 900:.3f} ({900 / 1050:.3f}–{1000 / 1100:.3f}")
    run = _run(ht=[1000.0, 900.0, 990.0], alone=([700.0, 500.0, 650.0], 400.0))  # 0.909, 1.0, 0.943
    assert verdicts(run, 98.5)[0]["met"] is True
    run = _run(ht=[1000.0, None, 990.0], alone=([700.0, 500.0, None], 400.0))  # one whole repetition left
    assert paired_ratios(run["settings"]["slow"], 2) == [round(1000 / 1100, 4)]
    run = _run(ht=[None] * 3)
    assert verdicts(run, 98.5)[0] == {"goal": verdicts(run, 98.5)[0]["goal"], "measured":
                                      "no repetition with every figure", "met": False}


def test_run_size_is_a_part_of_the_split_or_whole_passes_over_it():
    assert run_size(2000, 10_000) == ["--limit", "2000"]
    assert run_size(10_000, 10_000) == ["--limit", "10000"]
    assert run_size(12_000, 10_000) == ["--limit", "10000", "--repeat", "1"]  # not 20,000
    assert run_size(16_000, 10_000) == ["--limit", "10000", "--repeat", "2"]
    assert run_size(12_000, 1_000) == ["--limit", "1000", "--repeat", "12"]  # the embedded sample, as before


def test_figures_are_medians_with_the_range_of_images_per_s():
    def run(ips, p99, groups):
        return {"rc": 0, "error": None, "summary": {"status": "ok", "images_per_s": ips, "latency_ms": {"p99": p99},
                                                    "ha_deadline": {"answers_by_subset": groups}}}
    runs = [run(100.0, 9.0, {"0+1": 9, "0": 1}), run(300.0, 3.0, {"0+1": 10}), run(200.0, 5.0, {"0+1": 10})]
    runs[0]["summary"]["accuracy_by"] = {"0": {"answered": 70, "accuracy": 99.0},
                                         "1": {"answered": 30, "accuracy": 98.0}}
    runs.append({"rc": None, "error": "cut at 180 s", "summary": {}})  # a run cut short: no figures, not ok
    f = figures(runs)
    assert (f["images_per_s"], f["images_per_s_range"], f["p99"]) == (200.0, [100.0, 300.0], 5.0)
    assert f["images_per_s_runs"] == [100.0, 300.0, 200.0, None]  # in repetition order, for the pairing
    assert f["answered_by_runs"] == [{"0": 70, "1": 30}, {}, {}, {}]
    assert f["subset_share"] == {"0": round(1 / 30, 4), "0+1": round(29 / 30, 4)}
    assert (f["ok"], f["runs"], f["errors"]) == (3, 4, ["cut at 180 s"])


def test_run_order_keeps_the_ht_goals_rows_together_and_rotates():
    rows = [(label,) for label in ("Static", "Dynamic width 2", "Fluid HT", "Fluid HA", "Fluid HA, deadline 9 ms",
                                   "Fluid alone on node1", "Fluid alone on node2")]
    ht = {"Fluid HT", "Fluid alone on node1", "Fluid alone on node2"}
    orders = [[r[0] for r in run_order(rows, rep)] for rep in range(5)]
    for order in orders:
        assert sorted(order) == sorted(r[0] for r in rows)  # every row once
        at = [i for i, label in enumerate(order) if label in ht]
        assert at == list(range(at[0], at[0] + 3))  # back to back
    assert len({o[0] for o in orders}) == 5  # a different first row each repetition
    assert len({tuple(label for label in o if label in ht) for o in orders[:3]}) == 3  # the block's order rotates too
    plain = rows[:5]  # no host alone (the equal and stall settings): plain rotation
    assert [r[0] for r in run_order(plain, 2)] == [r[0] for r in plain[2:] + plain[:2]]
