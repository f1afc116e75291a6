"""Eight devices on the virtual cluster (root): `fluid-mpi launch` in HT and HA with no fault, then HT with
two devices powered off at once mid-run and a third device's cable pulled a little later. Prints, per run,
the exit code, inputs answered (each exactly once?), and for each fault the detection (fault -> the
launcher's host_lost event) and the time to the next answer; writes the same as JSON.

    python scripts/cluster_k8.py CHECKPOINT [--data-dir DIR] [--out runs/k8]

CHECKPOINT: a K = 8 Fluid checkpoint or its export directory (fluid-mpi train --family fluid --parts 8)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fluid_mpi.runtime.outputs import read_answered
from fluid_mpi.vcluster import emulator, fault_runs

NAME = "k8"
K = 8
# the run's length: enough inputs that both faults and both relaunches land well before the end
REPEAT = 3


def run(tmp: Path, tag: str, args: list[str], data_dir: str | None, faults=()) -> dict:
    """One launch; ``faults``: (answers, [(fault, host), ...]) steps, each waiting for the previous one's
    relaunch to answer before the next is injected."""
    launch = fault_runs.Launch(NAME, tmp, K, args + ["--repeat", str(REPEAT)], run=tag, data_dir=data_dir)
    rec: dict = {"run": tag, "faults": []}
    try:
        for at, step in faults:
            t_fault = launch.wait_answers(at, timeout=300)
            for fault, host in step:
                fault_runs.inject(NAME, fault, host)
            nxt = launch.next_answer_after(t_fault, timeout=120)
            rec["faults"].append({"at_answers": at, "faults": step, "t": t_fault,
                                  "next_answer_s": None if nxt is None else round(nxt, 3)})
        t0 = time.time()
        code, _, err = launch.finish(600)
        rec.update(code=code, error=None if code == 0 else err[-500:], finished_in_s=round(time.time() - t0, 1))
    finally:
        for _, step in faults:
            for fault, host in step:
                fault_runs.inject(NAME, "power-on" if fault == "power-off" else "cable-up", host)
    answered = read_answered(launch.preds)
    lost = launch.events_of("host_lost")
    for f in rec["faults"]:
        hosts = {h for _, h in f["faults"]}
        seen = [e for e in lost if e.get("host") in hosts]
        f["detected_s"] = {e["host"]: round(e["t"] - f["t"], 3) for e in seen}
        f["t"] = round(f["t"] - launch.t0, 3)
    summary = launch.summary()
    rec.update(answered=len(answered.indices), images=summary.get("images"), duplicates=summary.get("duplicates"),
               attempts=[(a["hosts"], a["reason"]) for a in summary["attempts"]],
               wall_s=round(launch.samples[-1][0] - launch.t0, 1) if launch.samples else None)
    rec["exactly_once"] = rec["answered"] == rec["images"] and rec["duplicates"] == 0
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="runs/k8")
    a = ap.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ckpt = str(Path(a.checkpoint).resolve())
    emulator.VCluster(NAME).up(K, str(out / "hosts"), head=True)
    results = []
    try:
        for mode, batch in (("ht", "4"), ("ha", "16")):
            results.append(run(out, f"{mode}-clean", ["-c", ckpt, "--mode", mode, "-b", batch], a.data_dir))
        n = 10000 if a.data_dir else 1000
        results.append(run(out, "ht-faults", ["-c", ckpt, "--mode", "ht", "-b", "4", "--rank-timeout", "2"],
                           a.data_dir, faults=[(n // 2, [("power-off", "node3"), ("power-off", "node6")]),
                                               (n // 2 + n // 4, [("cable", "node5")])]))
    finally:
        emulator.VCluster(NAME).down()
    (out / "k8.json").write_text(json.dumps(results, indent=1) + "\n")
    for r in results:
        print(json.dumps({k: v for k, v in r.items() if k != "error"}))
        if r.get("error"):
            print("  error:", r["error"])


if __name__ == "__main__":
    main()
