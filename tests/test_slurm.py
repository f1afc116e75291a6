"""The batch scripts in jobs/, run for real with `sbatch --wait` on a one-node Slurm started on this
machine (scripts/slurm-local.sh). Skips, with the reason, where Slurm cannot be had (not root, no apt,
or a Slurm this suite did not start is already running: it is never touched). The module fixture stops
exactly what it started, whatever the tests did."""
import json
import os
import shutil
import subprocess

import pytest

from conftest import REPO, seed_checkpoints

pytestmark = pytest.mark.mpi

SCRIPT = REPO / "scripts" / "slurm-local.sh"
# apt-get install of slurm-wlm + munge on a fresh machine takes 1-3 min; then the node registers in seconds
START_TIMEOUT_S = 300
# stop gives each daemon 10 s to save its state before SIGKILL (three daemons at most)
STOP_TIMEOUT_S = 60
# measured on the 2-core machine (2026-11-30, other tests running): infer job 15 s, fault-demo job 10 s,
# sbatch to exit; 60 s = 4 × the slower, as their mpirun start-up varies most under load
JOB_TIMEOUT_S = 60
# the quick bench's bound outside Slurm (fluid_mpi/bench.py QUICK_BOUND_S: measured 363 s × 1.5 = 545 s, with
# issue 10's interleaved repetitions), plus 20 s for Slurm to schedule and start the job
BENCH_JOB_TIMEOUT_S = 565


@pytest.fixture(scope="module")
def slurm_env():
    """Starts the local Slurm; yields the environment for sbatch (SLURM_CONF); stops what was started."""
    try:
        up = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True,
                            timeout=START_TIMEOUT_S)
        if up.returncode != 0 or shutil.which("sbatch") is None:
            pytest.skip(f"no local Slurm: {up.stderr.strip()[-300:]}")
        conf = up.stdout.strip().splitlines()[-1]
        assert conf.startswith("SLURM_CONF="), up.stdout
        yield dict(os.environ, SLURM_CONF=conf.split("=", 1)[1])
    finally:
        down = subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, text=True,
                              timeout=STOP_TIMEOUT_S)
        assert down.returncode == 0, down.stderr


def sbatch(env: dict, script: str, args: list[str], tmp_path, timeout: float) -> str:
    """``sbatch --wait`` (its exit code is the job's); fails with the job's output unless it exited 0.
    Returns that output. A job can exit 0 although its ranks failed (mpirun with ULFM has been seen
    to), so the tests also check what the job wrote."""
    name = f"fluid-test-{tmp_path.name}"
    cmd = ["sbatch", "--wait", "--nodes=1", "--ntasks=2", f"--job-name={name}",
           f"--output={tmp_path}/job-%j.out", str(REPO / "jobs" / script), *args]
    try:
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "--name", name], capture_output=True, env=env, timeout=STOP_TIMEOUT_S)
        pytest.fail(f"{script} did not finish in {timeout} s")
    logs = "\n".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert res.returncode == 0, f"{res.stdout}{res.stderr}\n--- job output ---\n{logs}"
    return logs


def job_json(path, logs: str) -> dict:
    """A JSON file the job must have written (fails with the job's output when it did not)."""
    assert path.is_file(), f"the job exited 0 but wrote no {path.name}\n--- job output ---\n{logs[-3000:]}"
    return json.loads(path.read_text())


def test_infer_job(slurm_env, ckpts, tmp_path):
    logs = sbatch(slurm_env, "infer.sbatch", [str(ckpts("fluid", 2)), "", "ht", str(tmp_path / "out")],
                  tmp_path, JOB_TIMEOUT_S)
    s = job_json(tmp_path / "out" / "summary.json", logs)
    assert s["status"] == "ok" and s["answered"] == s["images"] == 1000 and s["ranks_start"] == 2
    assert len((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()) == 1000


def test_fault_demo_job(slurm_env, ckpts, tmp_path):
    logs = sbatch(slurm_env, "fault-demo.sbatch",
                  [str(ckpts("fluid", 2)), "", "1", "kill", str(tmp_path / "out")], tmp_path, JOB_TIMEOUT_S)
    s = job_json(tmp_path / "out" / "summary.json", logs)
    assert s["status"] == "ok" and s["answered"] == s["images"] == 1000 and s["duplicates"] == 0
    assert [f["rank"] for f in s["failures"]] == [1] and s["ranks_end"] == 1


def test_bench_job_quick(slurm_env, bench_quick, tmp_path):
    """The bench as a Slurm job: its own mpiruns inside the allocation. It starts from the session bench's
    checkpoints and runs batch 64 only: what is tested is the job, the bench itself in test_bench.py."""
    seed_checkpoints(bench_quick, tmp_path / "bench")
    logs = sbatch(slurm_env, "bench.sbatch", ["", str(tmp_path / "bench"), "--quick", "--batch-sizes", "64"],
                  tmp_path, BENCH_JOB_TIMEOUT_S)
    r = job_json(tmp_path / "bench" / "results.json", logs)
    assert r["config"]["quick"] and r["config"]["batch_sizes"] == [64] and (tmp_path / "bench" / "results.md").exists()
    assert r["throughput"] and all(t["status"] == "ok" for t in r["throughput"])
