"""The thin real layer under the elastic driver: mpirun in its own process group, per-attempt
predictions and events files (a fence against ranks of earlier attempts), and the launcher's own event
lines. Everything that decides lives in elastic.py."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

from ..runtime.events import EventLog
from .mpirun import sweep_sessions_here
from . import hosts as hostlib
from .warm_pool import WarmPool

logger = logging.getLogger("fluid_mpi.cluster")

# Open MPI flags for a run across hosts (shared/MPI_NOTES.md): ULFM on; TCP between hosts; HAN off
# (open ULFM bugs); one rank per host in hostfile order; no binding (hosts of a virtual cluster share
# the same cores, and binding would pin every rank to core 0)
MPIRUN_FLAGS = ["--map-by", "node", "--bind-to", "none", "--with-ft", "ulfm", "--mca", "btl", "tcp,self",
                "--mca", "coll", "^han", "-x", "FLUID_MPI_RUN_ID"]  # the run's id in every rank's env
# after SIGKILL to its group mpirun is reaped at once; the bound only guards a wedged process table
REAP_TIMEOUT_S = 2.0


class MpirunJob:
    """One mpirun, leader of its own process group (so one kill ends it and every local child)."""

    def __init__(self, cmd: list[str], env: dict, log: Path):
        self.cmd, self.log = cmd, log
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=fh,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def poll(self) -> int | None:
        """mpirun's exit code once it ended."""
        return self.proc.poll()

    def drain(self) -> None:
        """SIGUSR2 to mpirun: it forwards it to every rank; infer finishes in-flight work and exits 5."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGUSR2)

    def kill(self) -> None:
        """SIGKILL to mpirun's whole process group (remote ranks are the cleanup's job)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=REAP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass


class MpirunLauncher:
    """Starts ``mpirun … python -X fluid_run=ID -m fluid_mpi.cli infer …`` on a subset of hosts. The
    ``-X`` option is ignored by Python but puts the run's marker on every rank's command line, so that
    ``pkill -f`` through the agent can end exactly this run's processes on any host."""

    def __init__(self, mpirun: str, infer_args: Sequence[str], files: "AttemptFiles", run_id: str,
                 agent: Sequence[str], env: dict, mpirun_args: Sequence[str] = (), python: str = sys.executable,
                 warm: WarmPool | None = None):
        self.mpirun, self.infer_args, self.files = mpirun, list(infer_args), files
        self.run_dir = files.run_dir
        self.run_id, self.agent, self.env = run_id, list(agent), env
        self.mpirun_args, self.python, self.warm = list(mpirun_args), python, warm

    @property
    def marker(self) -> str:
        """The string on every rank's command line."""
        return f"fluid_run={self.run_id}"

    def command(self, hosts: Sequence[str], attempt: int) -> list[str]:
        """The mpirun command of one attempt (its hostfile is written here)."""
        hostfile = hostlib.write_hostfile(hosts, self.run_dir / f"hosts-{attempt}")
        preds, events = self.files.begin(attempt)
        outputs = ["--predictions", str(preds), "--events", str(events),
                   "--summary", str(self.run_dir / f"infer-{attempt}.json")]
        # warm starts: each rank is a stub that the host's warm process forks the rank for (warm.py)
        entry = (["fluid_mpi.cli.warm", "stub", self.run_id, "--"] if self.warm is not None
                 else ["fluid_mpi.cli"])
        return [self.mpirun, "--hostfile", str(hostfile), "-np", str(len(hosts)), *MPIRUN_FLAGS,
                *self.mpirun_args, self.python, "-X", self.marker, "-m", *entry, "infer",
                *self.infer_args, "--resume", *outputs]

    def prepare(self, hosts: Sequence[str]) -> None:
        """Tidy the leftovers of killed daemons and mpiruns (see ``mpirun.SWEEP_SESSIONS``) on each host
        and here, where mpirun starts; then start a warm process on each host that has none (a host back
        from a power cut)."""
        hostlib.sweep_sessions(self.agent, hosts)
        sweep_sessions_here(self.env)
        if self.warm is not None:
            self.warm.start(hosts)

    def ready(self, host: str) -> bool:
        """The host can start a rank quickly (its warm process is ready; always, without warm starts)."""
        return self.warm is None or self.warm.ready(host)

    def responsive(self, host: str) -> bool:
        """The host's processes run (its warm process answers; without warm starts: assumed)."""
        return self.warm is None or self.warm.responsive(host)

    def start(self, hosts: Sequence[str], attempt: int) -> MpirunJob:
        """Run one attempt; its output goes to RUN_DIR/mpirun-ATTEMPT.log."""
        return MpirunJob(self.command(hosts, attempt), self.env, self.run_dir / f"mpirun-{attempt}.log")

    def cleanup(self, hosts: Sequence[str]) -> None:
        """Kill what is left of this run on those hosts (ranks of a killed job, frozen ones included)."""
        if hosts:
            hostlib.kill_marked(self.agent, hosts, self.marker)


class AttemptFiles:
    """Each attempt writes its own predictions and events files: the fence against a rank of an earlier
    attempt that lives on (a device that lost its cable, then takes over when it comes back) — it can
    only write to its own attempt's files, which nobody reads any more. The record (``--predictions``)
    is a symlink to the current attempt's file during the run, a plain file at the end; the launcher
    copies infer's events into the one events file as it reads them."""

    def __init__(self, predictions: Path, events: Path, run_dir: Path):
        self.predictions, self.events, self.run_dir = predictions, events, run_dir
        self.current: Path | None = None  # this attempt's events file
        self.made: list[Path] = []

    def begin(self, attempt: int) -> tuple[Path, Path]:
        """This attempt's files: the answers so far (complete lines, each input once) copied into a new
        predictions file that the record then points to, and an empty events file."""
        preds = self.run_dir / f"predictions-{attempt}.jsonl"
        _write_synced(preds, unique_lines(self.predictions))
        link = self.predictions.with_name(self.predictions.name + ".link")
        link.unlink(missing_ok=True)
        link.symlink_to(preds)
        os.replace(link, self.predictions)  # atomic: a reader sees the old or the new record
        self.current = self.run_dir / f"events-{attempt}.jsonl"
        self.current.write_bytes(b"")
        self.made += [preds, self.current]
        return preds, self.current

    def finish(self) -> None:
        """Make the record a plain file again and remove the per-attempt files."""
        if self.predictions.is_symlink():
            tmp = self.predictions.with_name(self.predictions.name + ".final")
            _write_synced(tmp, unique_lines(self.predictions))
            os.replace(tmp, self.predictions)
        for path in self.made:
            path.unlink(missing_ok=True)


def unique_lines(path: Path) -> bytes:
    """The complete lines of a predictions file, the first one of each input index only."""
    seen: set[int] = set()
    out = []
    try:
        with open(path, "rb") as fh:
            for line in fh:
                if not line.endswith(b"\n"):
                    break  # a torn last line: that input is answered again
                try:
                    idx = int(json.loads(line)["index"])
                except (ValueError, KeyError, TypeError):
                    continue
                if idx not in seen:
                    seen.add(idx)
                    out.append(line)
    except FileNotFoundError:
        pass
    return b"".join(out)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())  # the record must survive the launcher's own device going down


class FileOutputs:
    """Reads the current attempt's events incrementally (complete lines only) and copies them into the
    one events file; the predictions record's size and answers."""

    def __init__(self, files: AttemptFiles):
        self.files, self.predictions = files, files.predictions
        self.path, self.offset = None, 0

    def new_events(self) -> list[dict]:
        """Complete event lines infer appended since the last call (also copied to the events file)."""
        if self.path != self.files.current:
            self.path, self.offset = self.files.current, 0
        if self.path is None:
            return []
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        if complete:
            with open(self.files.events, "ab") as fh:
                fh.write(complete)
        out = []
        for line in complete.splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict) and ev.get("by") != "launch":
                out.append(ev)
        return out

    def progress(self) -> int:
        """The predictions file's size: it grows with every answered batch."""
        try:
            return self.predictions.stat().st_size
        except FileNotFoundError:
            return 0

    def answered(self) -> int:
        """Distinct input indices in the predictions file."""
        return len(read_indices(self.predictions)[0])


def read_indices(path: Path) -> tuple[set[int], int]:
    """(distinct input indices, how many lines repeated one) in a predictions file; a torn last line
    (no newline yet) is not counted."""
    seen: set[int] = set()
    repeats = 0
    try:
        with open(path, "rb") as fh:
            for line in fh:
                if not line.endswith(b"\n"):
                    break
                try:
                    idx = int(json.loads(line)["index"])
                except (ValueError, KeyError, TypeError):
                    continue
                repeats += idx in seen
                seen.add(idx)
    except FileNotFoundError:
        pass
    return seen, repeats


def launcher_events(path: Path) -> Callable[..., None]:
    """The launcher's own lines in the shared events file: the runtime's :class:`EventLog`, each record
    marked ``"by": "launch"`` (the ranks append to the same file), and each one logged."""
    log = EventLog(path, tag={"by": "launch"})

    def emit(event: str, **fields) -> None:
        log.emit(event, **fields)
        logger.info("fluid-mpi launch: %s: %s", event, ", ".join(f"{k} {v}" for k, v in fields.items()))
    return emit
