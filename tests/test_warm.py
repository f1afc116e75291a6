"""Warm starts (fluid_mpi/cluster/warm.py) with real processes, no MPI: a warm process forks the stub's
command with the stub's streams, environment, directory and exit status; a killed stub takes its
child along; a signal to the stub reaches the child; a stopped warm process makes the stub start cold,
and a fork that comes too late is killed; no warm process: cold. The whole launcher with warm starts
runs under real mpirun in tests/test_cluster_faults.py.

Most tests run the real entry point (``python -m fluid_mpi.cli.warm serve``, the CLI as the command);
the signal and late-fork tests give the warm process a probe command instead (``probe DIR``: notes
``started`` with its pid once its SIGTERM handler is in place, ``term`` when that handler runs, then
exits 43) and note every pid it forks, so that they wait on those events rather than on time."""
from __future__ import annotations

import json
import os
import signal
import socket
import struct
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


# The warm process of warm.serve with a probe command (see the module docstring); argv: RUN_ID DIR.
PROBE_SERVE = r"""
import os, signal, sys
from fluid_mpi.cluster import warm

run_id, d = sys.argv[1], sys.argv[2]
_fork = os.fork


def fork():  # note every child's pid in DIR/forks as soon as it exists (in the warm process only)
    pid = _fork()
    if pid:
        with open(os.path.join(d, "forks"), "a") as fh:
            fh.write(f"{pid}\n")
    return pid


os.fork = fork


def note(name, text):
    with open(os.path.join(d, name + ".tmp"), "w") as fh:
        fh.write(text)
    os.replace(os.path.join(d, name + ".tmp"), os.path.join(d, name))


def probe(argv):
    assert argv[0] == "probe", argv

    def on_term(signum, frame):
        note("term", str(os.getpid()))
        os._exit(43)

    signal.signal(signal.SIGTERM, on_term)
    note("started", str(os.getpid()))
    while True:
        signal.pause()


warm.serve(run_id, probe)
"""
PROBE_TERM_CODE = 43


@pytest.fixture
def probe_warm(tmp_path):
    """A warm process whose children run the probe command; (run id, process, its marker directory)."""
    run_id = uuid.uuid4().hex[:12]
    proc = subprocess.Popen([PY, "-c", PROBE_SERVE, run_id, str(tmp_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, start_new_session=True)
    try:
        line = _readline(proc, READY_TIMEOUT_S)
        assert line == b"ready\n", line
        yield run_id, proc, tmp_path
    finally:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        proc.wait(timeout=10)


def _marker(path, timeout: float) -> str | None:
    """The content of a marker file once it exists (written atomically), or None at the deadline."""
    return path.read_text() if _wait_for(path.exists, timeout) else None


def _forks(d) -> list[int]:
    """The pids the probe warm process has forked so far."""
    try:
        return [int(x) for x in (d / "forks").read_text().split()]
    except FileNotFoundError:
        return []


def _state(pid: int) -> str:
    """State letter of a process ('' when gone)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    return _state(pid) not in ("", "Z", "X")


def _catches(pid: int, sig: int) -> bool:
    """Whether process pid has a handler for sig (the SigCgt mask of /proc/PID/status)."""
    try:
        line = next(x for x in open(f"/proc/{pid}/status") if x.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)


def _frame(obj: dict) -> bytes:
    """One message of the stub's protocol: a 4-byte big-endian length, then JSON."""
    data = json.dumps(obj).encode()
    return struct.pack("!I", len(data)) + data


def _read_frame(sock: socket.socket) -> dict:
    buf = b""
    while len(buf) < 4 or len(buf) < 4 + struct.unpack("!I", buf[:4])[0]:
        chunk = sock.recv(4096)
        assert chunk, "the warm process closed the connection"
        buf += chunk
    return json.loads(buf[4:])


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


def test_sigterm_to_the_stub_reaches_the_rank(probe_warm):
    """SIGTERM to the stub reaches the rank (its own handler runs), and the stub then ends with the rank's
    exit status. Waits on events, not time: the rank's 'started' marker (its handler in place) and the
    stub's SIGTERM handler (its forwarding, installed right after the fork's reply)."""
    run_id, server, d = probe_warm
    p = stub(run_id, "probe", str(d))
    try:
        started = _marker(d / "started", RUN_TIMEOUT_S)
        assert started is not None, "the warm process forked no rank (no 'started' marker)"
        child = int(started)
        assert _children(server.pid) == [child]
        assert _wait_for(lambda: _catches(p.pid, signal.SIGTERM), RUN_TIMEOUT_S), \
            "the stub never installed its SIGTERM forwarding"
        p.send_signal(signal.SIGTERM)
        term = _marker(d / "term", RUN_TIMEOUT_S)
        assert term == str(child), f"the rank never received the SIGTERM sent to its stub (marker: {term})"
        assert p.wait(timeout=RUN_TIMEOUT_S) == PROBE_TERM_CODE  # the rank's status, through the stub
        assert _wait_for(lambda: _children(server.pid) == [], 5)
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


def test_frozen_warm_process_stub_starts_cold(probe_warm):
    """A stopped warm process does not answer the stub's ping: after REPLY_TIMEOUT_S the stub runs its
    command itself. Thawed, the warm process drops the stale connection without forking anything."""
    run_id, server, d = probe_warm
    os.kill(server.pid, signal.SIGSTOP)
    try:
        assert _wait_for(lambda: _state(server.pid) == "T", 5)
        assert not warm.ping(run_id, timeout=0.5)
        t0 = time.monotonic()
        p = stub(run_id, "vcluster", "exec", "--help")
        out, err = p.communicate(timeout=RUN_TIMEOUT_S)
        assert p.returncode == 0 and "Usage" in out, err  # cold: the stub ran the CLI itself
        assert time.monotonic() - t0 >= warm.REPLY_TIMEOUT_S * 0.9  # waited for the reply, then went cold
    finally:
        os.kill(server.pid, signal.SIGCONT)
    # connections are accepted in order: once a new ping is answered, the stale one has been handled
    assert _wait_for(lambda: warm.ping(run_id, timeout=1.0), RUN_TIMEOUT_S)
    assert _forks(d) == [] and _children(server.pid) == []


def test_late_fork_is_killed(probe_warm):
    """The warm process stops after its pong, the stub's request arrives, the stub gives up waiting for the
    pid and closes (it then starts cold): thawed, the warm process forks for the stale request, cannot
    hand the child over, and kills it. First proves the fork happened (its pid, noted at fork time), then
    that this pid is gone."""
    run_id, server, d = probe_warm
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:  # the stub's side, step by step
        sock.settimeout(RUN_TIMEOUT_S)
        sock.connect(warm.socket_name(run_id))
        sock.sendall(_frame({"ping": 1}))
        assert "pong" in _read_frame(sock)
        os.kill(server.pid, signal.SIGSTOP)
        try:
            assert _wait_for(lambda: _state(server.pid) == "T", 5)
            with open(os.devnull, "r+b") as null:  # the stub's three streams
                socket.send_fds(sock, [_frame({"argv": ["probe", str(d)], "env": dict(os.environ), "cwd": str(d)})],
                                [null.fileno()] * 3)
        except BaseException:
            os.kill(server.pid, signal.SIGCONT)
            raise
    # the connection is closed (the stub gave up): now the warm process goes on
    os.kill(server.pid, signal.SIGCONT)
    assert _wait_for(lambda: _forks(d), RUN_TIMEOUT_S), "the thawed warm process forked no rank for the request"
    (late,) = _forks(d)
    assert _wait_for(lambda: not _alive(late), 5), f"the late fork (pid {late}) is still running"
    assert late not in _children(server.pid)
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
