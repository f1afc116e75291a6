"""How to run a command on another host, the way mpirun reaches it: PRRTE's launch agent
(``PRTE_MCA_plm_ssh_agent``, e.g. the virtual cluster's) or else ssh in batch mode. The runtime's
liveness policy uses it to kill a frozen rank out of band; the launcher's host probes use it too."""
from __future__ import annotations

import os
import shlex
import subprocess
from typing import Mapping, Sequence

# An ssh/agent command to a live host answers well within a second; a host that takes more than 3 s is
# treated as unreachable (ssh's own ConnectTimeout is set to the same).
REMOTE_TIMEOUT_S = 3.0


def agent_command(env: Mapping[str, str] | None = None, connect_timeout: float = REMOTE_TIMEOUT_S) -> list[str]:
    """How this cluster reaches a host, as mpirun does: PRRTE's ``plm_ssh_agent`` setting (env
    ``PRTE_MCA_plm_ssh_agent``, may hold arguments), else ssh in batch mode with a connect timeout (a
    remote command must never wait for a password). The one definition; ``cluster/hosts.py`` uses it."""
    env = os.environ if env is None else env
    agent = env.get("PRTE_MCA_plm_ssh_agent", "").strip()
    if agent:
        return shlex.split(agent)
    return ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, int(connect_timeout))}"]


def remote_command(host: str, argv: Sequence[str] | str, agent: Sequence[str] | None = None) -> list[str]:
    """``AGENT HOST 'CMD…'``: like ssh, the agent hands one string to the remote shell, so an argument
    list is quoted; a string is a shell command line, passed as it is."""
    line = argv if isinstance(argv, str) else shlex.join(argv)
    return [*(agent_command() if agent is None else agent), host, line]


def run_command(argv: list[str], timeout: float) -> tuple[int | None, str]:
    """Run ``argv``; returns (exit code, or None when it did not end within ``timeout`` s or could not
    start; its output). It is not waited for after a timeout: an agent that entered a frozen host cannot
    die until the host is thawed (SIGKILL stays pending), and nobody may wait for that."""
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    except OSError as exc:
        return None, str(exc)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # reaped later by subprocess's own clean-up of finished children
        return None, f"no answer within {timeout:g} s"
    return proc.returncode, out or ""


def run_remote(host: str, argv: list[str], timeout: float = REMOTE_TIMEOUT_S) -> bool:
    """Run ``argv`` on ``host``; True when it exited 0 within ``timeout`` seconds."""
    return run_command(remote_command(host, argv), timeout)[0] == 0
