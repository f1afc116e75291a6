"""``fluid-mpi bench faults``: a whole device lost, for each fault kind, on the virtual cluster (network
namespaces on this machine, see docs/vcluster.md), under ``fluid-mpi launch`` and a real mpirun.

Per fault kind and repetition (the repetitions go round-robin over the kinds): a run with the fault
injected after a seeded random number of answers, then a clean run on the surviving devices alone,
which gives their capacity. Measured from outside, as a user sees it: detection (fault -> the
launcher's ``host_lost`` event), fault -> next answer, throughput after recovery against that capacity,
and power-on -> answering again (``rejoin`` event). Medians with min and max go to OUT/faults.md and
faults.json (``--publish DIR``: DIR/fault-results.md and .json)."""
from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..vcluster import emulator as vcluster
from ..vcluster.fault_runs import Launch, inject, vcl
from ..cluster.runner import read_indices

# its own vcluster instance, never the user's nor the tests'
VC_NAME = "fmfault"
# after the relaunch's first answer, this long is left out of the throughput (the new attempt's ranks
# finish their first batches and the coordinator's pipeline fills) and the rejoin waits at least this
# long before the power-on, so that the survivors' throughput has a window
SETTLE_S = 0.5
STEADY_S = 2.5
# A rejoin run is this many times longer: the fault (~1 s in), the relaunch (~1 s), the survivors' window
# (STEADY_S) and the rejoin (~4-6 s) must all fit before the inputs run out. At K = 4 a normal run answers
# its 20,000 inputs in ~7 s on a quiet machine, and CI saw a rejoin run end before the device was back.
REJOIN_LENGTH = 2
# one run: start-up (~3 s), ~10 s of inputs at batch 1 on 2 cores, a relaunch; a run past this is cut
RUN_TIMEOUT_S = 120.0


@dataclass
class Scenario:
    """One fault kind: the cluster size, how the run is made, which host fails and how."""

    name: str  # short, for --scenario
    label: str
    k: int
    mode: str
    batch: int
    fault: str  # power-off | cable | data-cable | freeze
    victim: str
    rejoin: bool = False  # the device comes back (power-on) after STEADY_S
    rank_timeout: float = 2.0  # infer's silence deadline: what detects a freeze

    @property
    def survivors(self) -> list[str]:
        return [f"node{i}" for i in range(1, self.k + 1) if f"node{i}" != self.victim]


SCENARIOS = [
    Scenario("power-off", "power-off", 2, "ht", 1, "power-off", "node2"),
    Scenario("cable", "cable pulled", 3, "ha", 4, "cable", "node3"),
    Scenario("data-cable", "data cable pulled, ssh still answers", 3, "ht", 4, "data-cable", "node3"),
    Scenario("freeze", "frozen", 3, "ht", 1, "freeze", "node3"),
    Scenario("rejoin", "power-off, then power-on", 4, "ht", 1, "power-off", "node2", rejoin=True),
    Scenario("coordinator", "coordinator's device powered off (mpirun on head)", 3, "ha", 4, "power-off", "node1"),
]


@dataclass
class FaultConfig:
    out: Path
    data_dir: str | None = None
    quick: bool = False
    reps: int = 5
    repeat: int = 2  # passes over the inputs per run (the full test set twice: ~20 s at batch 1)
    scenarios: list[Scenario] = field(default_factory=lambda: list(SCENARIOS))

    @classmethod
    def make(cls, out, data_dir, quick: bool, only: tuple[str, ...] = ()) -> "FaultConfig":
        """``only``: the names of the scenarios to run (all when empty)."""
        # the embedded test split has 1,000 images: 20 passes make a run of the same length. --quick
        # too: during a freeze's ~4 s of detection the survivors go on answering (~3k/s on a quiet
        # machine), and half as many inputs left no window after the relaunch to measure
        repeat = 2 if data_dir else 20
        scenarios = [sc for sc in SCENARIOS if not only or sc.name in only]
        return cls(Path(out), data_dir, quick, reps=1 if quick else 5, repeat=repeat, scenarios=scenarios)


def checkpoints(cfg: FaultConfig) -> dict[int, Path]:
    """A small Fluid checkpoint per K, trained on the embedded sample: these runs measure time, not
    accuracy (reused when present)."""
    from ..model import data
    from ..model.recipe import train_and_save
    from ..model.train import TrainConfig

    out = {}
    for k in sorted({s.k for s in cfg.scenarios}):
        path = cfg.out / "checkpoints" / f"fluid-k{k}-faults.pt"
        if not path.exists():
            train_and_save(TrainConfig("fluid", k, epochs=1, limit=800, seed=1), data.load_split(None, "train"),
                           data.load_split(None, "test").take(200), path)
        out[k] = path
    return out


def one_run(cfg: FaultConfig, sc: Scenario, ckpt: Path, rep: int, tmp: Path, tag: str = "") -> dict:
    """The fault run, then the survivors' clean run; every figure in seconds (None: not reached)."""
    repeat = cfg.repeat * (REJOIN_LENGTH if sc.rejoin else 1)
    args = ["-c", str(ckpt), "--mode", sc.mode, "-b", str(sc.batch), "--rank-timeout", str(sc.rank_timeout),
            "--repeat", str(repeat)]
    total = repeat * (10000 if cfg.data_dir else 1000)
    point = random.Random(f"{sc.label}/{rep}").randint(total // 10, total // 4)
    run = Launch(VC_NAME, tmp, sc.k, args, run=f"{tag}fault-{rep}", data_dir=cfg.data_dir)
    rec: dict = {"rep": rep, "fault_at_answers": point}
    try:
        t_fault = run.wait_answers(point)
        inject(VC_NAME, sc.fault, sc.victim)
        next_s = run.next_answer_after(t_fault)
        t_on = None
        if sc.rejoin and next_s is not None:
            time.sleep(STEADY_S)  # the survivors' window before the device comes back
            t_on = time.time()
            inject(VC_NAME, "power-on", sc.victim)
        code, _, err = run.finish(RUN_TIMEOUT_S)
    finally:
        _reset(sc)
    lost = run.events_of("host_lost")
    rejoins = run.events_of("rejoin")
    answered, repeats = read_indices(run.preds)
    t_next = None if next_s is None else t_fault + next_s
    end = t_on or _last_answer(run)
    after = run.rate(t_next + SETTLE_S, end) if t_next and end else None
    relaunches = run.events_of("relaunch")
    rec.update(lost=[[e.get("host"), e.get("fault")] for e in lost],
               relaunch_hosts=relaunches[0].get("hosts") if relaunches else None)
    rec.update(code=code, answered=len(answered), images=total, duplicates=repeats,
               detected_s=_r(lost[0]["t"] - t_fault) if lost else None, next_answer_s=_r(next_s),
               rejoin_s=_r(rejoins[0]["t"] - t_on) if rejoins and t_on else None,
               after_rate=_r(after, 1), error=None if code == 0 else err.strip()[-300:])
    clean = Launch(VC_NAME, tmp, len(sc.survivors), args, hosts=sc.survivors, run=f"{tag}capacity-{rep}",
                   data_dir=cfg.data_dir)
    clean.finish(RUN_TIMEOUT_S)
    first = next((t for t, n in clean.samples if n > 0), None)
    capacity = clean.rate(first + SETTLE_S, _last_answer(clean)) if first else None
    rec.update(capacity_rate=_r(capacity, 1),
               after_over_capacity=_r(after / capacity) if after and capacity else None)
    return rec


def _reset(sc: Scenario) -> None:
    """Leave the victim as new for the next run: thawed, power-cycled (kills any orphan), link up."""
    if sc.fault == "freeze":
        vcl(VC_NAME, "thaw", sc.victim)
    vcl(VC_NAME, "power-off", sc.victim)
    vcl(VC_NAME, "power-on", sc.victim)
    if sc.fault in ("cable", "data-cable"):  # power and cable are separate: a power cycle leaves it unplugged
        vcl(VC_NAME, "cable", sc.victim, "up")


def _last_answer(run: Launch) -> float | None:
    last = run.samples[-1][1] if run.samples else 0
    return next((t for t, n in run.samples if n >= last and n > 0), None)


def _r(value: float | None, nd: int = 3) -> float | None:
    return None if value is None else round(value, nd)


def stats(values: list) -> dict | None:
    """Median, min and max of the measured values (None where nothing was measured)."""
    vals = [v for v in values if v is not None]
    return {"median": round(statistics.median(vals), 3), "min": min(vals), "max": max(vals), "n": len(vals)} \
        if vals else None


# the goals: answers resume within 3 s of a power-off or a pulled cable; for a freeze the
# deadline is --rank-timeout's (infer's silence deadline, then the relaunch): rank-timeout + 3 s here;
# a device that comes back is answering again within 5 s
def goal_next(sc: Scenario) -> float:
    if sc.fault == "freeze":
        return sc.rank_timeout + 3.0
    # a data cable: mpirun does not end by itself; two missed probes a second apart, each waiting up to the
    # data path's connect timeout, come before the relaunch: one second more than a cable
    return 4.0 if sc.fault == "data-cable" else 3.0


REJOIN_GOAL_S = 5.0
FIGURES = ("detected_s", "next_answer_s", "after_over_capacity", "after_rate", "capacity_rate", "rejoin_s")


def run_faults(cfg: FaultConfig) -> dict:
    """The whole bench; writes OUT/faults.json and faults.md and returns the results."""
    started = time.time()
    cfg.out.mkdir(parents=True, exist_ok=True)
    ckpts = checkpoints(cfg)
    tmp = cfg.out / "runs-faults"
    shutil.rmtree(tmp, ignore_errors=True)
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {sc.label: [] for sc in cfg.scenarios}
    try:
        vcluster.VCluster(VC_NAME).up(4, str(cfg.out / "faults-hosts"), head=True)
        for rep in range(cfg.reps):  # round-robin: a slow spell of the machine hits every kind alike
            for i, sc in enumerate(cfg.scenarios):
                try:
                    runs[sc.label].append(one_run(cfg, sc, ckpts[sc.k], rep, tmp, f"{i}-"))
                except RuntimeError as exc:  # the run never reached its fault point: recorded, not hidden
                    runs[sc.label].append({"rep": rep, "code": None, "answered": 0, "images": None,
                                           "duplicates": 0, "error": str(exc)[-300:],
                                           **{k: None for k in FIGURES}})
    finally:
        vcluster.VCluster(VC_NAME).down()
    rows = []
    for sc in cfg.scenarios:
        rs = runs[sc.label]
        row = {**asdict(sc),
               "runs": len(rs), "ok": sum(r["code"] == 0 and r["answered"] == r["images"] and r["duplicates"] == 0
                                          for r in rs)}
        for key in FIGURES:
            row[key] = stats([r[key] for r in rs])
        row["goal_next_s"] = goal_next(sc)
        med = (row["next_answer_s"] or {}).get("median")
        row["next_met"] = med is not None and med <= goal_next(sc)
        if sc.rejoin:
            rj = (row["rejoin_s"] or {}).get("median")
            row["rejoin_met"] = rj is not None and rj <= REJOIN_GOAL_S
        rows.append(row)
    result = {"command": "fluid-mpi bench faults" + (" --quick" if cfg.quick else "")
              + (f" --data-dir {cfg.data_dir}" if cfg.data_dir else "") + f" --out {cfg.out}",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
              "load_before": [round(v, 2) for v in load_before],
              "load_after": [round(v, 2) for v in os.getloadavg()], "reps": cfg.reps, "repeat": cfg.repeat,
              "rows": rows, "runs": runs, "wall_s": round(time.time() - started, 1)}
    (cfg.out / "faults.json").write_text(json.dumps(result, indent=1) + "\n")
    from .report_faults import render

    (cfg.out / "faults.md").write_text(render(result))
    return result


def publish_faults(out: Path, dest: Path) -> None:
    """Copy OUT/faults.md and faults.json to DEST/fault-results.md and .json."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "faults.md", dest / "fault-results.md")
    shutil.copyfile(out / "faults.json", dest / "fault-results.json")
