"""Device faults on the virtual cluster, for real: ``fluid-mpi launch`` started inside a host, a fault
injected at a chosen number of answers, and what it did measured from outside (the predictions file's
growth, sampled every 20 ms, and the launcher's events). Used by ``fluid-mpi bench faults``
(bench/faults.py) and by tests/test_cluster_faults.py, so that the figures and the tests measure the
same way. Needs root (network namespaces)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from . import emulator as vc

PY = sys.executable
FLUID_MPI = str(Path(PY).parent / "fluid-mpi")
# answers are counted every 20 ms: a fault lands within a few batches of its point, figures are to 0.02 s
SAMPLE_S = 0.02
# a fault command takes well under a second; 30 s only bounds a wedged ip/cgroup call
VCL_TIMEOUT_S = 30.0


def vcl(name: str, *args: str) -> subprocess.CompletedProcess:
    """``fluid-mpi vcluster --name NAME ARGS`` as a subprocess (the same CLI a user types)."""
    return subprocess.run([PY, "-m", "fluid_mpi.cli", "vcluster", "--name", name, *args], capture_output=True,
                          text=True, timeout=VCL_TIMEOUT_S)


def inject(name: str, fault: str, host: str) -> None:
    """power-off | cable | data-cable | freeze of ``host`` (and power-on | cable-up | thaw to undo)."""
    args = {"power-off": ["power-off", host], "power-on": ["power-on", host], "cable": ["cable", host, "down"],
            "data-cable": ["cable", host, "down", "--data-only"], "cable-up": ["cable", host, "up"],
            "freeze": ["freeze", host], "thaw": ["thaw", host]}[fault]
    res = vcl(name, *args)
    if res.returncode != 0:
        raise RuntimeError(f"vcluster {' '.join(args)}: {res.stderr.strip()}")


class Launch:
    """``fluid-mpi launch`` started inside a host (as on the head or the first Pi), in its own process
    group, killed with it at the hard timeout of :meth:`finish`. A thread samples the answers."""

    def __init__(self, name: str, tmp: Path, k: int, args: Sequence[str], host: str = "head",
                 hosts: Sequence[str] | None = None, run: str = "run", resume: bool = False,
                 data_dir: str | None = None):
        self.dir = Path(tmp) / run
        self.dir.mkdir(parents=True, exist_ok=True)
        hostfile = Path(tmp) / f"hosts-{run}-{host}"
        hostfile.write_text("".join(f"{h} slots=1\n" for h in hosts or [f"node{i}" for i in range(1, k + 1)]))
        self.preds, self.events = self.dir / "predictions.jsonl", self.dir / "events.jsonl"
        cmd = [FLUID_MPI, "launch", "-np", str(k), "--hostfile", str(hostfile), "--run-dir", str(self.dir),
               "-q", *(["--data-dir", str(data_dir)] if data_dir else []), *args] + (["--resume"] if resume else [])
        self.t0 = time.time()
        self.proc = subprocess.Popen([PY, "-m", "fluid_mpi.cli", "vcluster", "--name", name, "exec", host, "--",
                                      *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=vc.mpirun_env(dict(os.environ), name), start_new_session=True)
        self.samples: list[tuple[float, int]] = []  # (time, answers so far)
        self._counted = (None, 0, 0)  # (inode, bytes read, complete lines) of the record so far
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while self.proc.poll() is None:
            self.samples.append((time.time(), self.answered_lines()))
            time.sleep(SAMPLE_S)
        self.samples.append((time.time(), self.answered_lines()))

    def answered_lines(self) -> int:
        """Complete lines in the predictions record so far. Read incrementally (sampled every 20 ms
        during a measured run, a whole re-read would load the machine it measures); counted afresh
        when the record is replaced (each attempt's file, the final de-duplicated one) or shrinks."""
        try:
            with open(self.preds, "rb") as fh:
                st = os.fstat(fh.fileno())
                ino, offset, count = self._counted
                if ino != st.st_ino or st.st_size < offset:
                    offset, count = 0, 0
                fh.seek(offset)
                data = fh.read()
        except FileNotFoundError:
            return 0
        count += data.count(b"\n")
        self._counted = (st.st_ino, offset + len(data), count)
        return count

    def wait_answers(self, n: int, timeout: float = 60) -> float:
        """Block until n answers are written (the fault point); returns that time. Raises if the
        launcher ends first or takes longer than ``timeout`` (start-up takes ~3 s on 2 cores)."""
        deadline = time.time() + timeout
        while self.answered_lines() < n:
            if self.proc.poll() is not None:
                raise RuntimeError(f"launch ended before {n} answers: {self.finish(1)[2][-500:]}")
            if time.time() > deadline:
                raise RuntimeError(f"fewer than {n} answers after {timeout} s")
            time.sleep(SAMPLE_S)
        return time.time()

    def next_answer_after(self, t_fault: float, timeout: float = 60) -> float | None:
        """Seconds from the fault to the first answer of the relaunched attempt (None if the run ended
        first): waits for the `relaunch` event, then for the predictions file to grow."""
        deadline = time.time() + timeout  # a relaunch takes ~1-3 s on 2 cores with warm starts
        while not [e for e in self.events_of("relaunch") if e["t"] >= t_fault]:  # this fault's relaunch
            if self.proc.poll() is not None or time.time() > deadline:
                return None
            time.sleep(SAMPLE_S)
        count = self.answered_lines()
        while self.answered_lines() <= count:
            if self.proc.poll() is not None or time.time() > deadline:
                return None
            time.sleep(SAMPLE_S)
        return time.time() - t_fault

    def rate(self, start: float, end: float | None = None) -> float | None:
        """Answers per second between two times (from the samples); None if under 0.3 s of data."""
        pts = [(t, n) for t, n in self.samples if t >= start and (end is None or t <= end)]
        if len(pts) < 2 or pts[-1][0] - pts[0][0] < 0.3:
            return None
        return (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])

    def finish(self, timeout: float) -> tuple[int | None, str, str]:
        """Exit code (None when killed at the hard timeout), stdout, stderr."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
            code = self.proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            out, err = self.proc.communicate()
            code = None
        self._sampler.join(timeout=1)
        return code, out, err

    def events_of(self, kind: str) -> list[dict]:
        """The events file's records of one kind."""
        try:
            lines = self.events.read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                ev = json.loads(line)
            except ValueError:
                continue  # a line being written
            if ev.get("event") == kind:
                out.append(ev)
        return out

    def summary(self) -> dict:
        """The launcher's summary.json."""
        return json.loads((self.dir / "summary.json").read_text())
