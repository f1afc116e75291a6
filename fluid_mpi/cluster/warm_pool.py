"""The launcher's side of warm starts (see warm.py): one warm process per host for the whole run,
started through the agent as mpirun starts its daemons, and stopped at the end."""
from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from . import hosts as hostlib

# How often wait_ready looks at the hosts' warm processes: fine next to a 2-20 s torch import.
POLL_S = 0.05


class WarmPool:
    """Warm processes of one run, by host. ``start`` is idempotent (a host whose warm process died, a
    power-cycled board, gets a new one); ``ready`` says whether a host's process has finished importing."""

    def __init__(self, agent: Sequence[str], run_id: str, python: str, log_dir: Path,
                 spawn: Callable[..., subprocess.Popen] = subprocess.Popen):
        self.agent, self.run_id, self.python, self.log_dir = list(agent), run_id, python, log_dir
        self.spawn = spawn
        self.procs: dict[str, subprocess.Popen] = {}
        self._ready: dict[str, bool] = {}

    @property
    def marker(self) -> str:
        """On the warm processes' command lines (and their forked ranks'): not the run's rank marker,
        so that cleaning up an attempt's ranks leaves the warm processes alone."""
        return f"fluid_warm={self.run_id}"

    def command(self, host: str) -> list[str]:
        """``AGENT HOST python -X fluid_warm=ID -m fluid_mpi.cli.warm serve ID``."""
        return hostlib.remote_argv(host, [self.python, "-X", self.marker, "-m", "fluid_mpi.cli.warm",
                                          "serve", self.run_id], self.agent)

    def start(self, hosts: Sequence[str]) -> None:
        """Start a warm process on every host that has none running (does not wait for it)."""
        for host in hosts:
            proc = self.procs.get(host)
            if proc is not None and proc.poll() is None:
                continue
            self._ready[host] = False
            log = open(self.log_dir / f"warm-{host}.log", "ab")
            # stdin stays open: the warm process ends (and kills its ranks) when it closes, i.e. when
            # this launcher ends or its connection to the host breaks
            proc = self.spawn(self.command(host), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=log, start_new_session=True)
            log.close()
            self.procs[host] = proc
            threading.Thread(target=self._read, args=(host, proc), daemon=True).start()

    def _read(self, host: str, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            if line.strip() == b"ready" and self.procs.get(host) is proc:
                self._ready[host] = True

    def ready(self, host: str) -> bool:
        """The host's warm process is up and has imported everything."""
        proc = self.procs.get(host)
        return proc is not None and proc.poll() is None and self._ready.get(host, False)

    def responsive(self, host: str) -> bool:
        """The host's warm process answers a ping (run on the host through the agent): False on a host
        whose processes are all stopped, even where the agent itself still gets in."""
        argv = [self.python, "-m", "fluid_mpi.cli.warm", "ping", self.run_id]
        return hostlib.run_on(self.agent, host, argv, hostlib.PROBE_TIMEOUT_S)[0] == 0

    def wait_ready(self, hosts: Sequence[str], timeout: float, stop: Callable[[], bool] = lambda: False,
                   clock: Callable[[], float] = time.monotonic) -> list[str]:
        """Wait until every host's warm process is ready, at most ``timeout`` s (or until ``stop()``);
        returns the hosts that are not (their ranks then start cold)."""
        end = clock() + timeout
        while True:
            late = [h for h in hosts if not self.ready(h)]
            if not late or clock() >= end or stop():
                return late
            time.sleep(POLL_S)

    def close(self, hosts: Sequence[str]) -> None:
        """Stop every warm process: close their stdin (they exit and kill their ranks), kill the agent
        processes, and kill what may remain on the hosts (an unreachable host's, when it comes back)."""
        for proc in self.procs.values():
            try:
                proc.stdin.close()
            except OSError:
                pass
            proc.kill()
        if hosts:
            hostlib.kill_marked(self.agent, hosts, self.marker)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=hostlib.PROBE_TIMEOUT_S)  # killed above: bound only guards a wedged agent
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()
