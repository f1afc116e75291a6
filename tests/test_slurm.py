"""The batch scripts in jobs/, run for real with `sbatch --wait` on a one-node Slurm started on this
machine (scripts/slurm-local.sh). Skips, with the reason, where Slurm cannot be had."""
import json
import shutil
import subprocess

import pytest

from conftest import REPO

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def slurm():
    # installs Debian's slurm-wlm + munge when run as root with apt, configures and starts one node
    up = subprocess.run(["bash", str(REPO / "scripts" / "slurm-local.sh"), "start"], capture_output=True,
                        text=True, timeout=300)
    if up.returncode != 0 or shutil.which("sbatch") is None:
        pytest.skip(f"no local Slurm: {up.stderr.strip()[-300:]}")
    return True


def sbatch(script: str, args: list[str], tmp_path, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = ["sbatch", "--wait", "--nodes=1", "--ntasks=2", f"--output={tmp_path}/job-%j.out",
           str(REPO / "jobs" / script), *args]
    try:
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "--name", script.split(".")[0]], capture_output=True)
        pytest.fail(f"{script} did not finish in {timeout} s")
    logs = "\n".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert res.returncode == 0, f"{res.stdout}{res.stderr}\n--- job output ---\n{logs}"
    return res


def test_infer_job(slurm, ckpts, tmp_path):
    sbatch("infer.sbatch", [str(ckpts("fluid", 2)), "", "ht", str(tmp_path / "out")], tmp_path)
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["status"] == "ok" and s["answered"] == s["images"] == 1000 and s["ranks_start"] == 2
    assert len((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()) == 1000


def test_fault_demo_job(slurm, ckpts, tmp_path):
    sbatch("fault-demo.sbatch", [str(ckpts("fluid", 2)), "", "1", "kill", str(tmp_path / "out")], tmp_path)
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["status"] == "ok" and s["answered"] == 1000 and s["duplicates"] == 0
    assert [f["rank"] for f in s["failures"]] == [1] and s["ranks_end"] == 1


def test_bench_job_quick(slurm, tmp_path):
    sbatch("bench.sbatch", ["", str(tmp_path / "bench"), "--quick"], tmp_path, timeout=600)
    r = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert r["config"]["quick"] and r["throughput"] and (tmp_path / "bench" / "results.md").exists()
