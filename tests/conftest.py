"""Shared fixtures: tiny checkpoints trained on the embedded data, and a hard-timeout mpirun runner."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"


def find_mpirun() -> str | None:
    """$MPIEXEC, else the mpirun beside this Python (the venv's Open MPI), else PATH."""
    if os.environ.get("MPIEXEC"):
        return os.environ["MPIEXEC"]
    local = Path(sys.executable).parent / "mpirun"
    return str(local) if local.exists() else shutil.which("mpirun")


def mpi_env() -> dict:
    env = dict(os.environ)
    env.update({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    return env


@dataclass
class MpiResult:
    returncode: int | None  # None: killed at the timeout
    stdout: str
    stderr: str
    seconds: float
    summary: dict | None
    predictions: list[dict]


def run_mpi(np_: int, args: list[str], tmp: Path, timeout: float = 90, ft: bool = True,
            extra_mpi: list[str] | None = None, name: str = "run") -> MpiResult:
    """``mpirun -np N fluid-mpi infer ARGS --summary --predictions`` in its own process group, killed
    whole at ``timeout``."""
    import time

    mpirun = find_mpirun()
    if mpirun is None:
        pytest.skip("no mpirun found (install Open MPI: scripts/setup.sh does)")
    summary, preds = tmp / f"{name}.json", tmp / f"{name}.jsonl"
    cmd = [mpirun, "-np", str(np_), "--oversubscribe", "--bind-to", "none"]
    cmd += (["--with-ft", "ulfm"] if ft else []) + (extra_mpi or [])
    cmd += [sys.executable, "-m", "fluid_mpi.cli", "infer", *args, "--summary", str(summary),
            "--predictions", str(preds), "--with-logits", "-q"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=mpi_env(),
                            cwd=REPO, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rc = None
    seconds = time.monotonic() - t0
    data = json.loads(summary.read_text()) if summary.exists() else None
    lines = [json.loads(line) for line in preds.read_text().splitlines()] if preds.exists() else []
    return MpiResult(rc, out, err, seconds, data, lines)


def _train(tmp_path_factory, family: str, parts: int, limit: int = 800, epochs: int = 1) -> Path:
    from fluid_mpi import checkpoint, data
    from fluid_mpi.evaluate import accuracy_report
    from fluid_mpi.train import TrainConfig, train

    cfg = TrainConfig(family, parts, epochs=epochs, limit=limit, seed=1)
    model, log = train(cfg, data.load_split(None, "train"), progress=False)
    test = data.load_split(None, "test").take(200)
    meta = {"family": family, "parts": parts, "widths": cfg.widths.as_dict(), "train": cfg.as_dict(),
            "log": log, "accuracy": accuracy_report(model, family, test), "test_data": test.source}
    path = tmp_path_factory.mktemp("ckpt") / f"{family}{parts}.pt"
    checkpoint.save_checkpoint(path, model, meta)
    return path


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    """Lazily trained tiny checkpoints, keyed (family, parts)."""
    cache: dict = {}

    def get(family: str, parts: int = 2) -> Path:
        if (family, parts) not in cache:
            cache[(family, parts)] = _train(tmp_path_factory, family, parts)
        return cache[(family, parts)]

    return get


@pytest.fixture
def shared_mnist() -> Path:
    if not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"full MNIST not found at {SHARED_MNIST}")
    return SHARED_MNIST
