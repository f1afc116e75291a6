"""Warm starts (fluid_mpi/cluster/warm.py) with real processes, no MPI: a warm process forks the stub's
command with the stub's streams, environment, directory and exit status; a killed stub takes its
child along; a stopped warm process makes the stub start cold; no warm process: cold. The whole
launcher with warm starts runs under real mpirun in tests/test_cluster_faults.py."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from fluid_mpi.cluster import warm

PY = sys.executable
# generous bounds: a warm process imports torch (~2.5 s quiet, ~10 s on a loaded 2-core machine)
READY_TIMEOUT_S = 60
RUN_TIMEOUT_S = 30


@pytest.fixture
def warm_proc():
    """A warm process for a fresh run id, stopped (SIGKILL to its group) after the test."""
    run_id = uuid.uuid4().hex[:12]
    proc = subprocess.Popen([PY, "-m", "fluid_mpi.cli.warm", "serve", run_id], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, start_new_session=True)
    try:
        line = _readline(proc, READY_TIMEOUT_S)
        assert line == b"ready\n", line
        yield run_id, proc
    finally:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:  # the test ended it already
                pass
        proc.wait(timeout=10)


def _readline(proc: subprocess.Popen, timeout: float) -> bytes:
    import select

    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else b""


def stub(run_id: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "fluid_mpi.cli.warm", "stub", run_id, "--", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_stub_runs_its_command_in_a_forked_child(warm_proc, tmp_path):
    run_id, server = warm_proc
    p = stub(run_id, "vcluster", "exec", "--help", cwd=tmp_path)
    out, err = p.communicate(timeout=RUN_TIMEOUT_S)
    assert p.returncode == 0, err
    assert "Usage: fluid-mpi vcluster exec" in out  # the child wrote to the stub's stdout
    assert warm.ping(run_id)


def test_exit_code_and_stderr_pass_through(warm_proc, tmp_path):
    run_id, _ = warm_proc
    p = stub(run_id, "infer", "--checkpoint", str(tmp_path / "missing.pt"), "-q")
    out, err = p.communicate(timeout=RUN_TIMEOUT_S)
    assert p.returncode == 2 and "missing.pt" in err


def test_child_has_the_stubs_environment_and_directory(warm_proc, tmp_path):
    """The checkpoint comes from the stub's environment (FLUID_MPI_CHECKPOINT), relative to its cwd."""
    run_id, _ = warm_proc
    env = dict(os.environ, FLUID_MPI_CHECKPOINT="nope.pt")
    p = stub(run_id, "infer", "-q", cwd=tmp_path, env=env)
    _, err = p.communicate(timeout=RUN_TIMEOUT_S)
    assert p.returncode == 2 and "nope.pt" in err


def _children(pid: int) -> list[int]:
    """Live (not zombie) children of pid, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry))
    return out


def _wait_for(cond, timeout: float) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.02)  # 20 ms: the warm process reaps every 50 ms
    return cond()


def waiting_rank(run_id: str, server: subprocess.Popen, ckpts) -> subprocess.Popen:
    """A stub whose rank waits for input lines on its stdin (`infer --input -`), once forked."""
    p = subprocess.Popen([PY, "-m", "fluid_mpi.cli.warm", "stub", run_id, "--", "infer", "-q", "-c",
                          str(ckpts("fluid", 2)), "--input", "-"], stdin=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if not _wait_for(lambda: len(_children(server.pid)) == 1, RUN_TIMEOUT_S):
        p.kill()
        pytest.fail("the warm process forked no rank")
    return p


def test_killed_stub_takes_its_child_along(warm_proc, ckpts):
    """mpirun's teardown SIGKILLs the stub: the warm process kills the rank it forked for it."""
    run_id, server = warm_proc
    p = waiting_rank(run_id, server, ckpts)
    try:  # waits on its stdin
        (child,) = _children(server.pid)
        p.kill()
        p.wait(timeout=RUN_TIMEOUT_S)
        assert _wait_for(lambda: _children(server.pid) == [], 5), "the rank outlived its stub"
        assert not os.path.exists(f"/proc/{child}") or open(f"/proc/{child}/stat").read().split()[2] == "Z"
    finally:
        p.kill()


def test_signal_and_status_pass_through(warm_proc, ckpts):
    """SIGTERM to the stub reaches the rank; the stub then ends as the rank did."""
    run_id, server = warm_proc
    p = waiting_rank(run_id, server, ckpts)
    try:
        time.sleep(1.0)  # let the stub install its forwarding handlers (right after the fork's reply)
        p.send_signal(signal.SIGTERM)
        code = p.wait(timeout=RUN_TIMEOUT_S)
        assert code != 0 and _wait_for(lambda: _children(server.pid) == [], 5)
    finally:
        p.kill()


def test_rank_killed_stub_dies_of_the_same_signal(warm_proc, ckpts):
    """A rank SIGKILLed (--kill-rank, the OOM killer): its stub dies of SIGKILL too, which is what
    mpirun and ULFM see and recover from in-job."""
    run_id, server = warm_proc
    p = waiting_rank(run_id, server, ckpts)
    try:
        os.kill(_children(server.pid)[0], signal.SIGKILL)
        _, err = p.communicate(timeout=RUN_TIMEOUT_S)
        assert p.returncode == -signal.SIGKILL, err
    finally:
        p.kill()


def test_frozen_warm_process_stub_starts_cold_and_late_fork_is_killed(warm_proc):
    run_id, server = warm_proc
    os.kill(server.pid, signal.SIGSTOP)
    try:
        assert not warm.ping(run_id, timeout=0.5)
        t0 = time.time()
        p = stub(run_id, "vcluster", "exec", "--help")
        out, err = p.communicate(timeout=RUN_TIMEOUT_S)
        assert p.returncode == 0 and "Usage" in out, err
        assert time.time() - t0 >= warm.REPLY_TIMEOUT_S * 0.9  # waited for the reply, then went cold
    finally:
        os.kill(server.pid, signal.SIGCONT)
    time.sleep(0.5)  # the thawed warm process reads the stale request, forks, fails to reply, kills
    assert _wait_for(lambda: _children(server.pid) == [], 5)
    assert warm.ping(run_id)


def test_no_warm_process_runs_cold():
    p = stub(uuid.uuid4().hex[:12], "vcluster", "exec", "--help")
    out, err = p.communicate(timeout=RUN_TIMEOUT_S)
    assert p.returncode == 0 and "Usage: fluid-mpi vcluster exec" in out, err


def test_warm_process_ends_when_its_stdin_closes(warm_proc):
    run_id, server = warm_proc
    server.stdin.close()  # the launcher (or its ssh connection) went away
    assert server.wait(timeout=10) == 0
    assert not warm.ping(run_id, timeout=0.5)
