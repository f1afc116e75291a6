"""jobs/launch.sbatch on a multi-node Slurm: a virtual cluster (node1..node3 + head, `fluid-mpi vcluster`)
with slurmctld in head and one slurmd per node (`scripts/slurm-local.sh start --vcluster NAME`). A node of
the allocation is powered off mid-run; the job must go on (`--no-kill`, `fluid-mpi launch` relaunching
through `srun`), answer every input exactly once and exit 0. Root only; skips with the reason where
namespaces or Slurm cannot be had. The fixture stops Slurm and removes the virtual cluster whatever
happens, and checks that nothing of either is left."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, namespaces_refused

pytestmark = [pytest.mark.mpi, pytest.mark.full_mnist]

PY = sys.executable
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
NAME = f"s{os.getpid() % 10**6}"
SCRIPT = REPO / "scripts" / "slurm-local.sh"
STATE = Path(f"/run/fluid-mpi-slurm-{NAME}")  # slurm-local.sh's state directory for this instance
IMAGES = 10000  # the full MNIST test set: at batch 1 (HT) long enough to inject the fault mid-run
# apt-get install of slurm-wlm + munge on a fresh machine takes 1-3 min; then 3 nodes register in seconds
START_TIMEOUT_S = 300
# stop gives each of up to five daemons 10 s to save its state before SIGKILL
STOP_TIMEOUT_S = 90
# a vcluster operation takes well under a second; down waits up to 5 s for killed processes
VCL_TIMEOUT_S = 30
# sbatch to the fault point (1,500-4,000 answers): scheduling, preflight, three warm torch imports on 2
# shared cores, then the answers (measured 15-26 s at load 7); 120 s means something is wrong
FIRST_ANSWERS_TIMEOUT_S = 120
# the whole job: measured 42-74 s at load 7 (10,000 answers at batch 1 on 3 ranks, one relaunch); 180 s
# bounds it with room for a slower machine, and a hung job still ends the test in about 4 minutes
JOB_TIMEOUT_S = 180


def _reason() -> str | None:
    refused = namespaces_refused("Slurm-on-a-virtual-cluster tests", f"{NAME}-probe")
    if refused:
        return refused
    if not (SHARED / "t10k-images-idx3-ubyte.gz").exists():
        return f"full MNIST not found at {SHARED} (the run must last long enough to inject a fault)"
    return None


_REASON = _reason()
if _REASON:
    pytest.skip(_REASON, allow_module_level=True)


def vcl(*args: str) -> subprocess.CompletedProcess:
    """``fluid-mpi vcluster --name NAME ARGS``."""
    return subprocess.run([PY, "-m", "fluid_mpi.cli", "vcluster", "--name", NAME, *args], capture_output=True,
                          text=True, timeout=VCL_TIMEOUT_S)


def in_head(conf: str, *cmd: str) -> list[str]:
    """A Slurm client command run inside ``head``: the cluster's addresses are routed only there."""
    return [PY, "-m", "fluid_mpi.cli", "vcluster", "--name", NAME, "exec", "head", "--",
            "env", f"SLURM_CONF={conf}", *cmd]


def leftovers() -> list[str]:
    """What of this instance still exists: namespaces, processes naming its state directory, the directory."""
    spaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    left = [line.split()[0] for line in spaces.splitlines() if line.startswith(f"{NAME}-")]
    procs = subprocess.run(["pgrep", "-a", "-f", str(STATE)], capture_output=True, text=True, timeout=10).stdout
    left += [p for p in procs.splitlines() if "pgrep" not in p]
    return left + ([str(STATE)] if STATE.exists() else [])


@pytest.fixture(scope="module")
def slurm_vc(tmp_path_factory):
    """node1..node3 + head with Slurm on them; yields SLURM_CONF's path. Stops Slurm and removes the
    cluster whatever happens, then checks that nothing is left."""
    hostfile = tmp_path_factory.mktemp("vc") / "hosts"
    try:
        r = vcl("up", "3", "--hostfile", str(hostfile), "--head")
        assert r.returncode == 0, r.stderr
        up = subprocess.run(["bash", str(SCRIPT), "start", "--vcluster", NAME], capture_output=True, text=True,
                            timeout=START_TIMEOUT_S)
        if up.returncode != 0:
            pytest.skip(f"no Slurm on the virtual cluster: {up.stderr.strip()[-300:]}")
        last = up.stdout.strip().splitlines()[-1]
        assert last.startswith("SLURM_CONF="), up.stdout
        yield last.split("=", 1)[1]
    finally:
        try:
            down = subprocess.run(["bash", str(SCRIPT), "stop", "--vcluster", NAME], capture_output=True,
                                  text=True, timeout=STOP_TIMEOUT_S)
        finally:
            vcl("down")
        assert down.returncode == 0, down.stderr
        assert not leftovers(), f"left behind: {leftovers()}"


def test_node_powered_off_job_goes_on(slurm_vc, ckpts, tmp_path):
    seed = 7
    rng = random.Random(seed)
    fault_at, victim = rng.randint(1500, 4000), rng.choice(["node2", "node3"])  # node1 runs the batch script
    out = tmp_path / "out"
    preds = out / "predictions.jsonl"
    cmd = in_head(slurm_vc, "sbatch", "--wait", "--nodes=3", f"--job-name=fluid-test-{NAME}",
                  f"--output={tmp_path}/job-%j.out", str(REPO / "jobs" / "launch.sbatch"),
                  str(ckpts("fluid", 3)), str(SHARED), "ht", str(out), "-b", "1", "--rank-timeout", "2", "-q")
    t0 = time.time()
    job = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        deadline = t0 + FIRST_ANSWERS_TIMEOUT_S
        while (preds.read_bytes().count(b"\n") if preds.exists() else 0) < fault_at:
            assert job.poll() is None, f"the job ended before {fault_at} answers: {job.communicate()}"
            assert time.time() < deadline, f"fewer than {fault_at} answers after {FIRST_ANSWERS_TIMEOUT_S} s"
            time.sleep(0.02)  # 20 ms: the fault lands within a few answers of the seeded point
        t_fault = time.time()
        r = vcl("power-off", victim)
        assert r.returncode == 0, r.stderr
        try:
            stdout, stderr = job.communicate(timeout=JOB_TIMEOUT_S - (t_fault - t0))
        except subprocess.TimeoutExpired:
            subprocess.run(in_head(slurm_vc, "scancel", f"--name=fluid-test-{NAME}"), capture_output=True,
                           timeout=VCL_TIMEOUT_S)
            pytest.fail(f"the job did not end within {JOB_TIMEOUT_S} s")
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.communicate()
    logs = "\n".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    print(f"\nslurm job: {time.time() - t0:.1f} s, {victim} powered off after {fault_at} answers "
          f"({t_fault - t0:.1f} s in)")
    assert job.returncode == 0, f"{stdout}{stderr}\n--- job output ---\n{logs[-3000:]}"
    assert f"{IMAGES} of {IMAGES} inputs answered" in logs, logs[-3000:]
    indices = [json.loads(line)["index"] for line in preds.read_text().splitlines()]
    assert len(indices) == len(set(indices)), f"{len(indices) - len(set(indices))} inputs answered twice"
    assert sorted(indices) == list(range(IMAGES)), f"{IMAGES - len(set(indices))} inputs not answered"
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    lost = [e for e in events if e["event"] == "host_lost"]
    assert lost and lost[0]["host"] == victim, [e["event"] for e in events]
    assert any(e["event"] == "relaunch" for e in events)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit_code"] == 0 and summary["duplicates"] == 0
