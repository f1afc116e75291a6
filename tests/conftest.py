"""Shared fixtures: tiny checkpoints trained on the embedded data, and a hard-timeout mpirun runner."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fluid_mpi.cluster.mpirun import Launched, find_mpirun, mpirun_infer

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"


def namespaces_refused(what: str, probe: str) -> str | None:
    """Why ``what`` cannot run here (not root, or ``ip netns add`` refused), or None. ``probe``: a
    namespace name of the caller's, made and removed at once (10 s bounds a wedged ``ip`` call)."""
    if os.geteuid() != 0:
        return f"{what} need root (network namespaces, cgroups)"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True, timeout=10).returncode:
        return "network namespaces refused here (ip netns add failed)"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


def run_mpi(np_: int, args: list[str], tmp: Path, timeout: float = 90, ft: bool = True,
            extra_mpi: list[str] | None = None, name: str = "run", keep: str | None = None) -> Launched:
    """``mpirun -np N fluid-mpi infer ARGS`` with logits in the predictions; skips without mpirun.
    ``keep``: start from this predictions file content (for --resume) instead of none."""
    if find_mpirun() is None:
        pytest.skip("no mpirun found (install Open MPI: scripts/setup.sh does)")
    return mpirun_infer(np_, args, tmp, name, timeout, ft, extra_mpi, with_logits=True, keep=keep)


def _train(tmp_path_factory, family: str, parts: int, limit: int = 800, epochs: int = 1) -> Path:
    from fluid_mpi.model import data
    from fluid_mpi.model.recipe import train_and_save
    from fluid_mpi.model.train import TrainConfig

    cfg = TrainConfig(family, parts, epochs=epochs, limit=limit, seed=1)
    path = tmp_path_factory.mktemp("ckpt") / f"{family}{parts}.pt"
    train_and_save(cfg, data.load_split(None, "train"), data.load_split(None, "test").take(200), path)
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


@pytest.fixture(scope="session")
def bench_quick(tmp_path_factory) -> Path:
    """One `fluid-mpi bench --quick` for the session (its report and its trained checkpoints): the bench
    tests read it, and the Slurm and adaptive bench tests start from its checkpoints (the bench reuses a
    checkpoint trained for the same data and epochs) instead of training their own."""
    from click.testing import CliRunner

    from fluid_mpi.cli import cli

    if find_mpirun() is None:
        pytest.skip("no mpirun found")
    out = tmp_path_factory.mktemp("bench")
    res = CliRunner().invoke(cli, ["bench", "--quick", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def seed_checkpoints(bench_out: Path, out: Path) -> None:
    """Copy a bench's trained checkpoints into another bench's OUT, for it to reuse."""
    import shutil

    shutil.copytree(bench_out / "checkpoints", out / "checkpoints", dirs_exist_ok=True)


@pytest.fixture
def shared_mnist() -> Path:
    if not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"full MNIST not found at {SHARED_MNIST}")
    return SHARED_MNIST


SHM = Path("/dev/shm")


def _mapped_paths() -> set[str]:
    """Every file some live process has mapped (from /proc/*/maps)."""
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            lines = maps.read_text().splitlines()
        except OSError:  # the process ended meanwhile, or is not ours to read
            continue
        for fields in (line.split(maxsplit=5) for line in lines):
            if len(fields) == 6:  # address, perms, offset, device, inode, path
                mapped.add(fields[5].strip())
    return mapped


@pytest.fixture(scope="session", autouse=True)
def no_shm_leftovers():
    """Open MPI's shared-memory segment (/dev/shm/sm_segment.*, 16 MB of RAM each) is removed by mpirun's
    daemon when a job ends; a rank started without mpirun (a singleton, as in tests/test_warm.py) and
    then SIGKILLed leaves its segment behind. At the end of the session, remove the segments that this
    session created and that no live process maps."""
    before = set(SHM.glob("sm_segment.*")) if SHM.is_dir() else set()
    yield
    new = (set(SHM.glob("sm_segment.*")) if SHM.is_dir() else set()) - before
    if new:
        mapped = _mapped_paths()
        for path in new - {Path(p) for p in mapped}:
            path.unlink(missing_ok=True)
