"""Launching ``mpirun ... fluid-mpi infer`` from Python (the benchmark and the tests): its own process
group, a hard timeout after which the whole group is killed, and the JSON outputs read back."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


def find_mpirun() -> str | None:
    """$MPIEXEC, else the mpirun beside this Python (the venv's Open MPI), else the one on PATH."""
    if os.environ.get("MPIEXEC"):
        return os.environ["MPIEXEC"]
    local = Path(sys.executable).parent / "mpirun"
    return str(local) if local.exists() else shutil.which("mpirun")


# Open MPI keeps its session directories in $TMPDIR: mpirun's in ompi.PID, each remote daemon's in
# prted.PID, and removes them when it exits. A SIGKILLed mpirun or daemon (a power cut, a killed job, a
# test's timeout) leaves them behind, and a later mpirun or daemon that gets the same PID exits at once
# with status 213 (PRTE_ERR_SILENT): "A daemon failed to report back", or no output at all. Here 310
# prted.* and 149 ompi.* had piled up (32,768 PIDs): 1 launch in 30 across emulated hosts failed so. The
# sweep removes only our own directories whose process is gone. 6,000 leftovers: 1.2 s; 3: 4 ms.
SWEEP_SESSIONS = ('for d in "${TMPDIR:-/tmp}"/ompi.[0-9]* "${TMPDIR:-/tmp}"/prted.[0-9]*; do [ -O "$d" ] '
                  '&& ! [ -e "/proc/${d##*.}" ] && printf "%s\\0" "$d"; done | xargs -0r rm -rf; true')
# the sweep is a glob and a few stat calls (see above); the bound only guards a hung filesystem
SWEEP_TIMEOUT_S = 10.0


def sweep_sessions_here(env: dict | None = None) -> None:
    """Run :data:`SWEEP_SESSIONS` on this host (where mpirun starts), with ``env``'s TMPDIR."""
    try:
        subprocess.run(["sh", "-c", SWEEP_SESSIONS], env=env, timeout=SWEEP_TIMEOUT_S,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        pass  # a sweep that cannot run leaves things as they were: mpirun may still start


def mpi_env() -> dict:
    """This environment plus what a root user and one-thread ranks need."""
    env = dict(os.environ)
    env.update({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    return env


@dataclass
class Launched:
    """What one mpirun left: exit code (None when killed at the timeout), output, wall time, and the
    summary, predictions and events it wrote (``torn``: prediction lines that are not whole JSON objects,
    counted, never silently dropped)."""

    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    summary: dict | None
    predictions: list[dict]
    events: list[dict]
    torn: int


def mpirun_infer(np_: int, args: list[str], out_dir: Path, name: str, timeout: float = 120, ft: bool = True,
              extra_mpi: list[str] | None = None, with_logits: bool = False, keep: str | None = None) -> Launched:
    """``mpirun -np N fluid-mpi infer ARGS --summary OUT/NAME.json --predictions OUT/NAME.jsonl
    --events OUT/NAME.events.jsonl``; earlier outputs are removed first (``keep``: the predictions file
    starts with this text instead, for ``--resume``)."""
    mpirun = find_mpirun()
    if mpirun is None:
        raise FileNotFoundError("no mpirun found: run scripts/setup.sh (it installs Open MPI 5 from PyPI)")
    out_dir.mkdir(parents=True, exist_ok=True)
    summary, preds, events = out_dir / f"{name}.json", out_dir / f"{name}.jsonl", out_dir / f"{name}.events.jsonl"
    for stale in (summary, preds, events):
        stale.unlink(missing_ok=True)
    if keep is not None:
        preds.write_text(keep)
    cmd = [mpirun, "-np", str(np_), "--oversubscribe", "--bind-to", "none"]
    cmd += (["--with-ft", "ulfm"] if ft else []) + (extra_mpi or [])
    cmd += [sys.executable, "-m", "fluid_mpi.cli", "infer", *args, "--summary", str(summary),
            "--predictions", str(preds), "--events", str(events), "-q"] + (["--with-logits"] if with_logits else [])
    env = mpi_env()
    sweep_sessions_here(env)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rc = None
    seconds = time.monotonic() - t0
    data = json.loads(summary.read_text()) if summary.exists() else None
    lines, torn = read_json_lines(preds)
    return Launched(rc, out, err, seconds, data, lines, read_json_lines(events)[0], torn)


def read_json_lines(path: Path) -> tuple[list[dict], int]:
    """The JSON objects of a JSON-lines file, and how many lines were not whole objects."""
    good, torn = [], 0
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                good.append(json.loads(line))
            except ValueError:
                torn += 1
    return good, torn
