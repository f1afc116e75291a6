"""Hosts of a cluster: hostfile parsing, how to reach a host the way mpirun does (PRRTE's launch agent,
else ssh), and probes with a timeout. Pure functions plus a small dataclass; the only side effects are
the subprocesses that the probe functions run (injectable for tests)."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from .mpirun import SWEEP_SESSIONS
from ..runtime import remote

# A probe that takes longer than this counts as "no answer": ssh to a live Pi answers in well under a
# second on a LAN; 2 s leaves room for a loaded 2-core host without stalling recovery much.
PROBE_TIMEOUT_S = 2.0
# The preflight starts a Python interpreter on every host (about 0.3 s on a Pi 4, more cold): 20 s.
PREFLIGHT_TIMEOUT_S = 20.0

Runner = Callable[[list[str], float], tuple[int | None, str]]


@dataclass(frozen=True)
class HostSlot:
    """One hostfile line: a host name and how many ranks it takes."""

    hostname: str
    slots: int = 1

    def __str__(self) -> str:
        return f"{self.hostname} slots={self.slots}"


def parse_hostfile_text(text: str) -> list[HostSlot]:
    """Open MPI hostfile lines (``NAME [slots=N] [max_slots=M]``, ``#`` comments) in order; a host named
    twice keeps its first position and adds up its slots."""
    order: list[str] = []
    slots: dict[str, int] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, *fields = line.split()
        count = 1
        for field in fields:
            key, _, value = field.partition("=")
            if key == "slots" and value.isdigit():
                count = int(value)
        if name not in slots:
            order.append(name)
            slots[name] = 0
        slots[name] += count
    return [HostSlot(name, slots[name]) for name in order]


def parse_hostfile(path: str | os.PathLike) -> list[HostSlot]:
    """Read a hostfile; raises ``FileNotFoundError`` / ``ValueError`` (no hosts) for the CLI to report."""
    hosts = parse_hostfile_text(Path(path).read_text(encoding="utf-8"))
    if not hosts:
        raise ValueError(f"hostfile {path} names no host")
    return hosts


def write_hostfile(hosts: Sequence[str], path: str | os.PathLike) -> Path:
    """One ``NAME slots=1`` line per host (one rank per device), in the given order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{h} slots=1\n" for h in hosts), encoding="utf-8")
    return path


def agent_command(env: Mapping[str, str] | None = None) -> list[str]:
    """How mpirun reaches a host (the runtime's one definition), with the probe's connect timeout."""
    return remote.agent_command(env, PROBE_TIMEOUT_S)


remote_argv = remote.remote_command  # (host, cmd, agent) -> AGENT HOST 'CMD…'
_spawn_run = remote.run_command


def run_on(agent: Sequence[str], host: str, cmd: Sequence[str] | str, timeout: float = PROBE_TIMEOUT_S,
           run: Runner | None = None) -> tuple[int | None, str]:
    """Run CMD on HOST; returns (exit code, or None on timeout / agent missing; its output). ``run``
    replaces the process runner in tests: ``run(argv, timeout) -> (code, output)``."""
    return (run or _spawn_run)(remote_argv(host, cmd, agent), timeout)


def probe(agent: Sequence[str], host: str, timeout: float = PROBE_TIMEOUT_S,
          run: Runner | None = None, cmd: Sequence[str] = ("true",)) -> bool:
    """True when HOST runs ``cmd`` (by default ``true``; the launcher's is the data path check, see
    data_path.py) and it exits 0 within ``timeout`` seconds."""
    code, _ = run_on(agent, host, list(cmd), timeout, run)
    return code == 0


def probe_many(agent: Sequence[str], hosts: Sequence[str], timeout: float = PROBE_TIMEOUT_S,
               run: Runner | None = None, cmd: Sequence[str] = ("true",)) -> dict[str, bool]:
    """Probe hosts in parallel (one thread each): the whole call takes at most about ``timeout``."""
    return _on_each(hosts, lambda h: probe(agent, h, timeout, run, cmd))


def kill_marked(agent: Sequence[str], hosts: Sequence[str], marker: str, timeout: float = PROBE_TIMEOUT_S,
                run: Runner | None = None) -> dict[str, int | None]:
    """SIGKILL every process whose command line holds ``marker`` on every host (in parallel). The
    pattern's first character is bracketed so that the remote shell carrying it never matches itself;
    ``--ns $$ --nslist net`` keeps the kill to the host's own network namespace (the same as plain
    pkill on a real board; on the virtual cluster all hosts share one PID namespace)."""
    pattern = f"[{marker[0]}]{marker[1:]}"
    cmd = f"pkill --ns $$ --nslist net -KILL -f {shlex.quote(pattern)}"
    return _on_each(hosts, lambda h: run_on(agent, h, cmd, timeout, run)[0])


def sweep_sessions(agent: Sequence[str], hosts: Sequence[str], timeout: float = PROBE_TIMEOUT_S,
                   run: Runner | None = None) -> dict[str, int | None]:
    """Remove Open MPI session directories left by killed daemons on every host (in parallel; see
    ``mpirun.SWEEP_SESSIONS``)."""
    return _on_each(hosts, lambda h: run_on(agent, h, SWEEP_SESSIONS, timeout, run)[0])


def _on_each(hosts: Sequence[str], fn: Callable[[str], object]) -> dict:
    """``{host: fn(host)}``, one thread per host (at most 16): as long as the slowest host takes."""
    if not hosts:
        return {}
    with ThreadPoolExecutor(max_workers=min(len(hosts), 16)) as pool:
        return dict(zip(hosts, pool.map(fn, hosts)))


# Printed by every host in the preflight: its fluid-mpi version, its Open MPI version (from the mpirun
# beside its Python, as the ranks use) and which of the given paths exist.
_FACTS = r"""
import json, os, subprocess, sys
from importlib import metadata
def v(name):
    try:
        return metadata.version(name)
    except Exception:
        return None
mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
try:
    out = subprocess.run([mpirun if os.path.exists(mpirun) else "mpirun", "--version"],
                         capture_output=True, text=True, timeout=10).stdout
    ompi = out.split("\n")[0].split()[-1] if out.strip() else None
except Exception:
    ompi = None
print(json.dumps({"fluid_mpi": v("fluid-mpi"), "ompi": ompi,
                  "missing": [p for p in sys.argv[1:] if not os.path.exists(p)]}))
"""


def host_facts(agent: Sequence[str], host: str, paths: Sequence[str], python: str = sys.executable,
               timeout: float = PREFLIGHT_TIMEOUT_S, run: Runner | None = None) -> dict | str:
    """What HOST has (versions, missing paths) as a dict, or a one-line reason why it did not answer."""
    code, out = run_on(agent, host, [python, "-c", _FACTS, *paths], timeout, run)
    if code is None:
        return f"unreachable ({out})"
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if code != 0 or not lines:
        last = out.strip().splitlines()[-1] if out.strip() else f"exit code {code}"
        return f"unreachable or not set up ({last})"
    return json.loads(lines[-1])


def needed_paths(checkpoint: str, position: int, np_: int) -> list[str]:
    """What a host at hostfile position ``position`` needs: the checkpoint file, or, for an export
    directory, every part it may be asked to run after relaunches on fewer hosts (rank <= position)."""
    path = Path(checkpoint).resolve()
    if path.suffix == ".pt" or path.is_file():
        return [str(path)]
    return [str(path / f"part-{j}.pt") for j in range(min(position, np_ - 1) + 1)]


def preflight_problems(facts: Mapping[str, dict | str], want_fluid: str | None,
                       want_ompi: str | None) -> list[str]:
    """One line per problem, naming the host: unreachable, other versions, missing files."""
    problems = []
    for host, got in facts.items():
        if isinstance(got, str):
            problems.append(f"{host}: {got}")
            continue
        if got.get("fluid_mpi") != want_fluid:
            problems.append(f"{host}: fluid-mpi {got.get('fluid_mpi')} (here: {want_fluid})")
        if got.get("ompi") != want_ompi:
            problems.append(f"{host}: Open MPI {got.get('ompi')} (here: {want_ompi})")
        for missing in got.get("missing", []):
            problems.append(f"{host}: missing {missing}")
    return problems


def local_facts(python: str = sys.executable) -> dict:
    """The same facts about this machine (the versions every host must match)."""
    out = subprocess.run([python, "-c", _FACTS], capture_output=True, text=True,
                         timeout=PREFLIGHT_TIMEOUT_S).stdout  # bounded like a remote preflight
    return json.loads(out.strip().splitlines()[-1])
