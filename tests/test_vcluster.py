"""`fluid-mpi vcluster`: a uniquely named 2-node cluster with a head host, its faults, a real mpirun across
it, and a check that `down` leaves nothing behind. Root only (network namespaces, cgroups, /etc/hosts)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import namespaces_refused

from fluid_mpi.vcluster import emulator as vc

NAME = f"t{os.getpid() % 10**7}"
VENV_BIN = Path(sys.executable).parent
MPIRUN = str(VENV_BIN / "mpirun")
SEEN_PIDS: set[int] = set()  # every process seen inside a host; all must be gone after `down`

# One TCP server per call: answers each connection with "ok" and exits on its own after 20 s at the
# latest, so a failed test cannot leave it running.
SERVER = """import socket, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', 5601)); s.listen(); s.settimeout(1); end = time.time() + 20
while time.time() < end:
    try:
        c, _ = s.accept(); c.sendall(b'ok'); c.close()
    except OSError:
        pass
"""
CLIENT = """import socket, sys
try:
    print(socket.create_connection((sys.argv[1], 5601), timeout=float(sys.argv[2])).recv(2).decode())
except OSError as exc:
    print(type(exc).__name__); sys.exit(1)
"""


_REASON = namespaces_refused("vcluster tests", f"{NAME}-probe")
if _REASON:
    pytest.skip(_REASON, allow_module_level=True)


def run(cmd: list[str], timeout: float = 30, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run with a hard timeout; on timeout the whole process group is killed and the test fails."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {cmd}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def fm(*args: str, timeout: float = 30, env: dict | None = None) -> subprocess.CompletedProcess:
    """``fluid-mpi vcluster --name NAME ARGS``."""
    return run([sys.executable, "-m", "fluid_mpi.cli", "vcluster", "--name", NAME, *args], timeout, env)


def in_host(host: str, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return fm("exec", host, "--", *cmd, timeout=timeout)


class Background:
    """A command started in a host through `vcluster exec`, killed (its process group) when done."""

    def __init__(self, host: str, *cmd: str):
        argv = [sys.executable, "-m", "fluid_mpi.cli", "vcluster", "--name", NAME, "exec", host, "--", *cmd]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.ns = f"{NAME}-{host}"

    def pids(self, marker: str) -> list[int]:
        """Pids in the host whose command line contains ``marker``; waits up to 5 s for one (start-up)."""
        deadline = time.monotonic() + 5
        while True:
            found = [int(p) for p in run(["ip", "netns", "pids", self.ns], 10).stdout.split()
                     if marker in _cmdline(p)]
            SEEN_PIDS.update(found)
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def __enter__(self) -> "Background":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)  # reaped at once after SIGKILL; bound only against a wedged kernel


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    except OSError:  # exited meanwhile
        return ""


def proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def settles(check, seconds: float = 5) -> bool:
    """Poll ``check`` for up to ``seconds`` (a loaded machine schedules slowly)."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def connect(src: str, dst: str, timeout: float) -> str:
    """Client in ``src`` connecting to the SERVER in ``dst``: "ok", or the exception name."""
    return in_host(src, str(VENV_BIN / "python"), "-c", CLIENT, dst, str(timeout),
                   timeout=timeout + 15).stdout.strip()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """node1, node2 (in the hostfile) and head; always torn down."""
    hostfile = tmp_path_factory.mktemp("vcluster") / "hostfile"
    try:
        r = fm("up", "2", "--hostfile", str(hostfile), "--head")
        assert r.returncode == 0, r.stderr
        yield hostfile
    finally:
        fm("down")


def test_up_is_idempotent(cluster):
    again = fm("up", "2", "--hostfile", str(cluster), "--head")
    assert again.returncode == 0 and "already up" in again.stdout
    assert cluster.read_text().splitlines() == ["node1 slots=1", "node2 slots=1"]
    assert vc.hosts(NAME) == ["node1", "node2"] and vc.hosts(NAME, include_head=True)[-1] == "head"
    assert "10.213.0.254 head" in Path("/etc/hosts").read_text()


def test_exec_sees_own_hostname_and_address(cluster):
    r = in_host("node2", "sh", "-c", "hostname; ip -o -4 addr show dev eth0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "node2" and f"{vc.SUBNET}.2/24" in r.stdout
    assert in_host("node1", "sh", "-c", "exit 7").returncode == 7


def test_tcp_between_hosts_and_cable(cluster):
    with Background("node2", str(VENV_BIN / "python"), "-c", SERVER) as server:
        assert server.pids("socket")
        deadline = time.monotonic() + 10  # the server binds within a second of starting
        while connect("node1", "node2", 2) != "ok":
            assert time.monotonic() < deadline, "no TCP connection from node1 to node2"
            time.sleep(0.2)
        assert fm("cable", "node2", "down").returncode == 0
        assert connect("node1", "node2", 1) == "TimeoutError"
        assert fm("cable", "node2", "up").returncode == 0
        assert connect("node1", "node2", 3) == "ok"


def test_power_off_kills_and_power_on_is_empty(cluster):
    with Background("node1", "sleep", "60") as bg:
        assert bg.pids("sleep")
        assert fm("power-off", "node1").returncode == 0
        assert bg.proc.wait(timeout=5) != 0  # the kill is synchronous; 5 s is slack for a loaded machine
        assert run(["ip", "netns", "pids", f"{NAME}-node1"]).stdout.split() == []
        dead = in_host("node1", "true")
        assert dead.returncode == 255 and "No route to host" in dead.stderr
        assert fm("power-on", "node1").returncode == 0
        assert in_host("node1", "hostname").stdout.strip() == "node1"
        assert run(["ip", "netns", "pids", f"{NAME}-node1"]).stdout.split() == []


def test_freeze_and_thaw(cluster):
    with Background("node1", str(VENV_BIN / "python"), "-c",
                    "import time\nwhile True: time.sleep(0.01)  # frozen-probe") as bg:
        pid = max(bg.pids("frozen-probe"))  # the Python process, not the sh that started it
        assert settles(lambda: proc_state(pid) in "SR")  # D for a moment while Python starts up is normal
        assert fm("freeze", "node1").returncode == 0
        for _ in range(5):  # stays stopped; the v1 freezer shows frozen tasks as D
            assert proc_state(pid) in "DT"
            time.sleep(0.1)
        assert '"frozen": true' in fm("status", "--json").stdout
        assert fm("thaw", "node1").returncode == 0
        assert settles(lambda: proc_state(pid) in "SR")


def test_slow_limits_cpu(cluster):
    busy = ("import time\nw, c = time.time(), time.process_time()\nwhile time.time() - w < 1.0: pass\n"
            "print((time.process_time() - c) / (time.time() - w))")

    def share() -> float:
        r = in_host("node2", str(VENV_BIN / "python"), "-c", busy)
        assert r.returncode == 0, r.stderr
        return float(r.stdout)

    free = share()
    assert fm("slow", "node2", "--cpus", "0.3").returncode == 0
    try:
        limited = share()
    finally:
        assert fm("slow", "node2", "--cpus", "0").returncode == 0
    assert limited < 0.6 and limited < 0.75 * free, (free, limited)
    assert Path(f"/sys/fs/cgroup/cpu/fluid-mpi-{NAME}/node2/cpu.cfs_quota_us").read_text().strip() == "-1"


def test_slow_period(cluster):
    """--period-ms sets the quota's period, lengthened where the quota would fall under the kernel's 1 ms."""
    knob = Path(f"/sys/fs/cgroup/cpu/fluid-mpi-{NAME}/node2")
    try:
        assert fm("slow", "node2", "--cpus", "0.5", "--period-ms", "10").returncode == 0
        assert (knob / "cpu.cfs_period_us").read_text().strip() == "10000"
        assert (knob / "cpu.cfs_quota_us").read_text().strip() == "5000"
        assert fm("slow", "node2", "--cpus", "0.05", "--period-ms", "10").returncode == 0
        assert (knob / "cpu.cfs_period_us").read_text().strip() == "20000"
        assert (knob / "cpu.cfs_quota_us").read_text().strip() == "1000"
    finally:
        assert fm("slow", "node2", "--cpus", "0").returncode == 0


def test_pin(cluster):
    """`pin` keeps a host's processes (later ones too) on the given cores; `all` gives them every core back;
    a core the machine lacks is a one-line error."""
    last = os.cpu_count() - 1
    affinity = "import os; print(sorted(os.sched_getaffinity(0)))"
    try:
        assert fm("pin", "node2", str(last)).returncode == 0
        r = in_host("node2", str(VENV_BIN / "python"), "-c", affinity)
        assert r.returncode == 0 and r.stdout.strip() == f"[{last}]", (r.stdout, r.stderr)
        assert f"on cores {last}" in fm("status").stdout
        assert in_host("node1", str(VENV_BIN / "python"), "-c", affinity).stdout.strip() == \
            str(list(range(last + 1)))
        bad = fm("pin", "node2", str(last + 7))
        assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and "cannot pin node2" in bad.stderr
    finally:
        assert fm("pin", "node2", "all").returncode == 0
    r = in_host("node2", str(VENV_BIN / "python"), "-c", affinity)
    assert r.stdout.strip() == str(list(range(last + 1)))


def test_shape(cluster):
    def qdiscs(host: str) -> str:
        sw = run(["tc", "-n", f"{NAME}-sw", "qdisc", "show", "dev", f"{NAME}-{host[4:]}"]).stdout
        return sw + run(["tc", "-n", f"{NAME}-{host}", "qdisc", "show", "dev", "eth0"]).stdout

    assert fm("shape", "node1", "--rate", "100mbit").returncode == 0
    assert qdiscs("node1").count("tbf") == 2 and "tbf" not in qdiscs("node2")
    delay = fm("shape", "node1", "--delay", "10ms")
    if delay.returncode:  # this kernel has no netem
        assert delay.returncode == 2 and len(delay.stderr.splitlines()) == 1 and "netem" in delay.stderr
    else:
        assert "netem" in qdiscs("node1")
    assert fm("shape", "--rate", "50mbit").returncode == 0
    assert "tbf" in qdiscs("node2")
    assert fm("shape", "--clear").returncode == 0
    assert "tbf" not in qdiscs("node1") + qdiscs("node2")


def test_bad_input_is_one_line(cluster):
    for args in (["exec", "node9", "--", "true"], ["slow", "node1", "--cpus", "-1"], ["up", "0", "--hostfile", "x"],
                 ["power-off", "nosuch"], ["shape", "node1", "--rate", "fast"], ["shape", "node1"]):
        r = fm(*args)
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, (args, r.stderr)
        assert r.stderr.startswith("fluid-mpi: error: ")
    r = run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
             "fluid_mpi.cli", "vcluster", "status"])
    assert r.returncode == 2 and r.stderr.strip() == "fluid-mpi: error: vcluster needs root (network namespaces, " \
                                                     "cgroups, /etc/hosts)"


def _mpirun_from(host: str, hostfile: Path) -> None:
    """Each rank on its own host, and in that host's cgroups (which `slow` and `freeze` act on)."""
    probe = ("from mpi4py import MPI; import socket, re; cg = open('/proc/self/cgroup').read(); "
             "print(MPI.COMM_WORLD.Get_rank(), socket.gethostname(), "
             "*sorted(re.findall(r':(cpu|freezer):/fluid-mpi-[a-z0-9]+/(\\w+)', cg)))")
    cmd = [MPIRUN, "--hostfile", str(hostfile), "-np", "2", "--map-by", "node", "--mca", "btl", "tcp,self",
           "--mca", "coll", "^han", str(VENV_BIN / "python"), "-c", probe]
    r = fm("exec", host, "--", *cmd, timeout=60, env=vc.mpirun_env(dict(os.environ), NAME))
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.split("\n")[:2]) == [f"{rank} {h} ('cpu', '{h}') ('freezer', '{h}')"
                                                 for rank, h in ((0, "node1"), (1, "node2"))], r.stdout


@pytest.mark.mpi
def test_mpirun_across_hosts_from_node1(cluster):
    _mpirun_from("node1", cluster)


@pytest.mark.mpi
def test_mpirun_across_hosts_from_head(cluster):
    _mpirun_from("head", cluster)


def test_down_leaves_nothing(cluster, tmp_path):
    one = tmp_path / "one"
    assert fm("up", "1", "--hostfile", str(one)).returncode == 0  # another shape: rebuilt
    assert one.read_text() == "node1 slots=1\n" and vc.hosts(NAME, include_head=True) == ["node1"]
    with Background("node1", "sleep", "60") as bg:
        SEEN_PIDS.update(bg.pids("sleep"))
        for _ in range(2):  # idempotent
            assert fm("down").returncode == 0
        assert bg.proc.wait(timeout=5) != 0  # killed by down; 5 s is slack for a loaded machine
    assert not [ns for ns in run(["ip", "netns", "list"]).stdout.split() if ns.startswith(f"{NAME}-")]
    assert f"vcluster {NAME}" not in Path("/etc/hosts").read_text()
    assert not any(Path(f"/sys/fs/cgroup/{c}/fluid-mpi-{NAME}").exists() for c in ("cpu", "freezer"))
    assert not Path(f"/run/fluid-mpi-vcluster/{NAME}").exists()
    assert f"/run/fluid-mpi-vcluster/{NAME}/" not in Path("/proc/self/mountinfo").read_text()  # the agent's views
    alive = [p for p in SEEN_PIDS if Path(f"/proc/{p}").exists() and proc_state(p) != "Z"]
    assert not alive  # a zombie is dead: its parent was killed and init reaps it in its own time
    assert "not up" in fm("status").stdout
