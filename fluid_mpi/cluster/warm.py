"""Warm starts: a relaunched rank skips Python's and torch's start-up.

A relaunch after a lost device costs, above all, every rank's ``import torch`` (2.4 s on a quiet core
here, about 5 s when three emulated hosts share two cores; a Pi is slower still). So ``fluid-mpi launch``
starts one *warm process* per host for the whole run: it imports torch and fluid-mpi once, then waits.
Each attempt's ranks are started by mpirun as usual, but as a tiny *stub* (no torch) that asks its
host's warm process to fork a child for it. The child takes the stub's arguments, environment, working
directory and standard streams (passed as file descriptors), so it joins the MPI job exactly as the stub
would have (PMIx finds the daemon through the environment), and the stub stays as mpirun's process:
it forwards signals to the child and exits with the child's status.

- The warm process is single-threaded (``select``), so forking it is safe; it never runs a torch
  operation, so no thread pool exists to break in the children.
- When the stub dies (mpirun's teardown, ``pkill`` of the run marker), the warm process kills its child:
  a child is never left behind, even a stopped one.
- No warm process on the host (not started, not ready yet, a host that just came back): the stub runs
  infer itself, cold. The result is the same, only slower.
- The socket is in the abstract namespace, which is per network namespace: one warm process per host
  on real boards and on the virtual cluster alike, and nothing to clean up on disk.
"""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import sys
from typing import Callable

# Signals the stub passes on to its child: mpirun's teardown (TERM, then KILL, which cannot be caught
# and is handled by the warm process), Ctrl-C, the drain request (USR2), and stop/continue.
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT)
# The warm process's loop wakes at least this often to reap children: a dead child's status reaches its
# stub (and so mpirun and ULFM's failure detector) within 50 ms, at negligible idle cost.
REAP_EVERY_S = 0.05
# The stub waits this long for its child's pid: a fork takes milliseconds even on a loaded Pi, so a
# longer wait means a stopped (frozen) warm process, and the stub then starts cold instead of hanging.
REPLY_TIMEOUT_S = 3.0
_HEADER = struct.Struct("!I")
# Runs ``fluid-mpi ARGV`` in this process and returns its exit code: the CLI layer passes it in, so this
# module (below the CLI) never imports it.
Command = Callable[[list[str]], int]


def socket_name(run_id: str) -> str:
    """The warm process's address for one run (abstract namespace: a leading NUL)."""
    return f"\0fluid-mpi-warm-{run_id}"


def _send_msg(sock: socket.socket, obj: dict, fds: tuple[int, ...] = ()) -> None:
    data = json.dumps(obj).encode()
    payload = _HEADER.pack(len(data)) + data
    if fds:
        socket.send_fds(sock, [payload], list(fds))
    else:
        sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("peer closed")
        buf += chunk
    return buf


def _recv_msg(sock: socket.socket, max_fds: int = 0) -> tuple[dict, list[int]]:
    fds: list[int] = []
    if max_fds:
        head, fds, _flags, _addr = socket.recv_fds(sock, _HEADER.size, max_fds)
        if not head:
            raise EOFError("peer closed")
        head += _recv_exact(sock, _HEADER.size - len(head))
    else:
        head = _recv_exact(sock, _HEADER.size)
    (size,) = _HEADER.unpack(head)
    return json.loads(_recv_exact(sock, size)), fds


# ---------------------------------------------------------------------------------------------- stub


def run_stub(run_id: str, argv: list[str], run: Command) -> int:
    """mpirun's process for one rank: let the host's warm process fork the rank (returns its exit code,
    or dies of its signal); without a warm process, run the rank here with ``run`` (cold)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_name(run_id))
    except OSError:
        sock.close()
        return run(argv)
    sock.settimeout(REPLY_TIMEOUT_S)
    try:
        # a ping first: our streams must not be left in flight to a stopped warm process (they would
        # stay open, and mpirun waits for a rank's streams to close as well as for its exit)
        _send_msg(sock, {"ping": 1})
        _recv_msg(sock)
        _send_msg(sock, {"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}, (0, 1, 2))
        reply, _ = _recv_msg(sock)
    except (EOFError, OSError):  # gone or frozen before forking: start cold (a late fork is killed,
        sock.close()             # since the warm process cannot hand it over to a closed stub)
        return run(argv)
    sock.settimeout(None)
    child = int(reply["pid"])
    for sig in FORWARDED:
        signal.signal(sig, lambda signum, _frame: _forward(child, signum))
    try:
        status = _recv_msg(sock)[0]
    except (EOFError, OSError):  # the warm process was killed (the host's teardown): so was the child
        status = {"signal": int(signal.SIGKILL)}
    if status.get("signal"):  # die of the same signal, as mpirun and ULFM expect
        if status["signal"] not in (signal.SIGKILL, signal.SIGSTOP):  # those two have no handler
            signal.signal(status["signal"], signal.SIG_DFL)
        os.kill(os.getpid(), status["signal"])
    return int(status.get("code", 1))


def _forward(child: int, signum: int) -> None:
    try:
        os.kill(child, signum)
    except ProcessLookupError:
        pass


# ------------------------------------------------------------------------------------- warm process


def serve(run_id: str, run: Command) -> None:
    """The warm process of one host, its imports done by the caller: print ``ready``, then fork one child
    per stub, which runs the stub's ``fluid-mpi`` arguments with ``run``, until killed (``pkill`` of the
    run's warm marker through the agent, or the agent's connection closing)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_name(run_id))
    listener.listen(16)
    print("ready", flush=True)
    children: dict[int, socket.socket] = {}  # child pid -> its stub's connection
    doomed: set[int] = set()  # children killed because their stub went: no longer watched, only reaped
    while True:
        conns = {c.fileno(): (pid, c) for pid, c in children.items() if pid not in doomed}
        readable, _, _ = select.select([listener, sys.stdin, *[c for _, c in conns.values()]], [], [],
                                       REAP_EVERY_S)
        for r in readable:
            if r is listener:
                conn, _ = listener.accept()
                pid = _fork_child(listener, conn, children, run)
                if pid:
                    children[pid] = conn
            elif r is sys.stdin:
                if not os.read(sys.stdin.fileno(), 4096):  # the launcher's agent connection closed
                    _kill_all(children)
                    return
            else:  # a stub closed its connection (killed): its child goes too
                pid, conn = conns[r.fileno()]
                if not conn.recv(1):
                    _kill(pid)
                    doomed.add(pid)  # its closed connection stays readable: do not spin on it
        _reap(children)
        doomed &= children.keys()


def _fork_child(listener: socket.socket, conn: socket.socket, children: dict, run: Command) -> int:
    # every client pings first (a bare ping then closes); bounded reads, so that a client that stops
    # half-way cannot wedge this single-threaded loop
    conn.settimeout(REPLY_TIMEOUT_S)
    try:
        _recv_msg(conn)
        _send_msg(conn, {"pong": os.getpid()})
        request, fds = _recv_msg(conn, max_fds=3)
    except (EOFError, OSError, ValueError):
        conn.close()
        return 0
    conn.settimeout(None)
    pid = os.fork()
    if pid == 0:
        try:
            listener.close()
            for c in children.values():
                c.close()
            conn.close()
            _become_rank(request, fds, run)
        finally:
            os._exit(1)  # only if _become_rank raised before infer took over
    for fd in fds:
        os.close(fd)
    try:
        _send_msg(conn, {"pid": pid})
    except OSError:  # the stub gave up waiting (this process was frozen): it started cold instead
        _kill(pid)
        conn.close()
        return 0
    return pid


def _become_rank(request: dict, fds: list[int], run: Command) -> None:
    """In the forked child: take the stub's streams, environment and directory, then run its command."""
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
        os.close(fd)
    for sig in (signal.SIGCHLD, *FORWARDED):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.argv = ["fluid-mpi", *request["argv"]]
    os._exit(run(request["argv"]))


def _reap(children: dict) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is None:
            continue
        result = ({"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status)
                  else {"code": os.WEXITSTATUS(status)})
        try:
            _send_msg(conn, result)
        except OSError:
            pass
        conn.close()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill_all(children: dict) -> None:
    for pid in list(children):
        _kill(pid)


def ping(run_id: str, timeout: float = REPLY_TIMEOUT_S) -> bool:
    """True when this host's warm process answers within ``timeout`` s. A host whose every process is
    stopped (a frozen board) may still run a new command, as on the virtual cluster, where a new
    process does not join the freeze; its warm process, stopped with the rest, then does not answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(socket_name(run_id))
            _send_msg(sock, {"ping": 1})
            return "pong" in _recv_msg(sock)[0]
    except (EOFError, OSError, ValueError):
        return False
