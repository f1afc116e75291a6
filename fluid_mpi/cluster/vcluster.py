"""Virtual cluster: emulated hosts on one machine, for multi-host MPI runs with injected faults (root only).

Each host is a network namespace ``NAME-HOST`` with one interface ``eth0`` (address ``SUBNET.i``), joined by
a veth pair to a bridge inside a switch namespace ``NAME-sw`` (nothing is added to the root namespace's
network). Its processes also live in cgroup v1 directories ``fluid-mpi-NAME/HOST`` (cpu, freezer). A launch
agent (a shell script written by :meth:`VCluster.up`) stands in for ssh: ``AGENT HOST CMD...`` joins the
host's cgroups, enters its namespace under its own hostname (``unshare --uts``) and runs CMD through sh.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

from ..errors import FluidError

SUBNET = "10.213.0"  # private /24 used only inside the namespaces we create
PREFIX_LEN = 24
HEAD, HEAD_OCTET, MAX_NODES = "head", 254, 200
DEFAULT_NAME = "fmpi"
NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")  # short: "NAME-254" must fit a 15-char interface name
STATE_ROOT = Path("/run/fluid-mpi-vcluster")
CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("cpu", "freezer")
HOSTS_FILE = Path("/etc/hosts")
CMD_TIMEOUT = 15.0  # an ip/tc call takes milliseconds; the bound only guards against a wedged kernel call
SETTLE_TIMEOUT = 5.0  # SIGKILLed processes and a FREEZING cgroup settle in well under a second
POLL = 0.05  # polling interval while waiting for the above
TBF_LATENCY = "50ms"  # tbf queue bound: packets waiting longer are dropped, like a small switch buffer
RATE_RE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)$")
DELAY_RE = re.compile(r"^\d+(?:\.\d+)?(?:us|ms|s)$")


class VClusterError(FluidError):
    """A virtual-cluster operation is impossible (not root, namespaces refused, bad host, no cluster)."""


def resolve_name(name: str | None = None) -> str:
    """The instance name: ``name``, else $FLUID_MPI_VCLUSTER, else ``fmpi``; 1-8 of [a-z0-9]."""
    name = name or os.environ.get("FLUID_MPI_VCLUSTER") or DEFAULT_NAME
    if not NAME_RE.match(name):
        raise VClusterError(f"bad vcluster name {name!r}: 1-8 characters, a-z then a-z/0-9")
    return name


def agent_path(name: str | None = None) -> str:
    """Path of the launch agent (use as PRRTE's ``plm_ssh_agent``) of instance ``name``."""
    return str(STATE_ROOT / resolve_name(name) / "agent")


def mpirun_env(base: dict, name: str | None = None) -> dict:
    """``base`` plus what ``mpirun --hostfile HOSTFILE`` needs to start its daemons through the agent.

    Run the venv's mpirun by its absolute path: PRRTE then passes its prefix to the remote ``prted``."""
    env = dict(base)
    env["PRTE_MCA_plm_ssh_agent"] = agent_path(name)
    env.setdefault("HOME", "/root")  # opal_init fails with "Unable to get the user home directory" without it
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def hosts(name: str | None = None, include_head: bool = False) -> list[str]:
    """Host names of the running instance in hostfile order (node1..nodeN), plus ``head`` if asked and
    present; ``[]`` when the instance is not up."""
    state = VCluster(name).load()
    if state is None:
        return []
    names = [f"node{i}" for i in range(1, state["n"] + 1)]
    return names + ([HEAD] if include_head and state["head"] else [])


def _run(args: list[str], check: bool = True, timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise VClusterError(f"{args[0]} not found: install iproute2 (ip, tc) and util-linux (unshare)") from None
    except subprocess.TimeoutExpired:
        raise VClusterError(f"{shlex.join(args)}: no answer within {timeout:g} s") from None
    if check and proc.returncode:
        reason = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[0]
        raise VClusterError(f"{shlex.join(args)}: {reason}")
    return proc


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _write(path: Path, value: str) -> bool:
    try:
        path.write_text(value)
        return True
    except OSError:
        return False


class VCluster:
    """One instance of the virtual cluster; its state lives in ``/run/fluid-mpi-vcluster/NAME/``."""

    def __init__(self, name: str | None = None):
        self.name = resolve_name(name)
        self.dir = STATE_ROOT / self.name
        self.state_file = self.dir / "state.json"
        self.switch = f"{self.name}-sw"

    # -- naming ------------------------------------------------------------------------------------
    def ns(self, host: str) -> str:
        """Network namespace of ``host``."""
        return f"{self.name}-{host}"

    def veth(self, host: str) -> str:
        """Switch-side end of ``host``'s cable (the host side is ``eth0``)."""
        return f"{self.name}-{HEAD_OCTET if host == HEAD else host[4:]}"

    def cgroup(self, controller: str, host: str | None = None) -> Path:
        """cgroup v1 directory of the instance (or of ``host``) under ``controller``."""
        base = CGROUP_ROOT / controller / f"fluid-mpi-{self.name}"
        return base / host if host else base

    # -- state -------------------------------------------------------------------------------------
    def load(self) -> dict | None:
        """The state file's content, or None when the instance is not up."""
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None

    def _save(self, state: dict) -> None:
        self.state_file.write_text(json.dumps(state, indent=1))

    def _require(self, host: str | None = None) -> dict:
        _check_root()
        state = self.load()
        if state is None:
            raise VClusterError(f"no virtual cluster {self.name!r}: run `fluid-mpi vcluster up N --hostfile F`")
        if host is not None and host not in state["hosts"]:
            raise VClusterError(f"no host {host!r} in vcluster {self.name!r} (hosts: {', '.join(state['hosts'])})")
        return state

    # -- up / down ---------------------------------------------------------------------------------
    def up(self, n: int, hostfile: str, head: bool = False) -> bool:
        """Make hosts node1..nodeN (and ``head``) and write ``hostfile``. Returns False when a cluster of
        the same shape was already up (nothing changed but the hostfile); a different shape is torn down."""
        _check_root()
        if not 1 <= n <= MAX_NODES:
            raise VClusterError(f"N must be between 1 and {MAX_NODES}, not {n}")
        state = self.load()
        existed = state is not None and state["n"] == n and state["head"] == head
        if not existed:
            self.down()
            self._make(n, head)
        Path(hostfile).write_text("".join(f"node{i} slots=1\n" for i in range(1, n + 1)))
        return not existed

    def _make(self, n: int, head: bool) -> None:
        names = [f"node{i}" for i in range(1, n + 1)] + ([HEAD] if head else [])
        try:
            _run(["ip", "netns", "add", self.switch])
        except VClusterError as exc:
            raise VClusterError(f"network namespaces refused here ({exc})") from None
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "unreachable").mkdir(exist_ok=True)
        try:
            _run(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
            _run(["ip", "-n", self.switch, "link", "set", "br0", "up"])
            hosts_state = {}
            for host in names:
                octet = HEAD_OCTET if host == HEAD else int(host[4:])
                self._make_host(host, f"{SUBNET}.{octet}")
                hosts_state[host] = {"addr": f"{SUBNET}.{octet}", "powered": True, "cable": "up",
                                     "cpus": None, "shape": None}
            self._write_agent(names)
            self._hosts_block([f"{h['addr']} {host}" for host, h in hosts_state.items()])
            self._save({"name": self.name, "n": n, "head": head, "subnet": f"{SUBNET}.0/{PREFIX_LEN}",
                        "hosts": hosts_state})
        except BaseException:
            self.down()
            raise

    def _make_host(self, host: str, addr: str) -> None:
        ns, veth = self.ns(host), self.veth(host)
        _run(["ip", "netns", "add", ns])
        _run(["ip", "-n", self.switch, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
        _run(["ip", "-n", self.switch, "link", "set", veth, "master", "br0", "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{addr}/{PREFIX_LEN}", "dev", "eth0"])
        for dev in ("lo", "eth0"):
            _run(["ip", "-n", ns, "link", "set", dev, "up"])
        for ctl in CONTROLLERS:
            if (CGROUP_ROOT / ctl / "cgroup.procs").exists():
                self.cgroup(ctl, host).mkdir(parents=True, exist_ok=True)

    def _write_agent(self, names: list[str]) -> None:
        joins = "\n".join(f'd={self.cgroup(ctl)}/"$host"; [ -d "$d" ] && {{ echo $$ > "$d/cgroup.procs" || exit 255; }}'
                          for ctl in CONTROLLERS)
        script = f"""#!/bin/sh
# fluid-mpi vcluster {self.name}: launch agent standing in for ssh. Usage: agent HOST CMD...
# Joins HOST's cgroups (a frozen host freezes the agent too, like ssh to a hung board), then runs CMD
# through sh inside HOST's network namespace under HOST's own hostname.
host="$1"; shift
case "$host" in {'|'.join(names)}) ;; *) echo "ssh: Could not resolve hostname $host" >&2; exit 255;; esac
if [ -e "{self.dir}/unreachable/$host" ]; then
    echo "ssh: connect to host $host port 22: No route to host" >&2; exit 255
fi
{joins}
exec ip netns exec "{self.name}-$host" unshare --uts sh -c "hostname $host; $*"
"""
        path = Path(agent_path(self.name))
        path.write_text(script)
        path.chmod(0o755)

    def _hosts_block(self, lines: list[str]) -> None:
        """Replace (or with no lines remove) this instance's block in /etc/hosts, edited in place."""
        begin, end = f"# BEGIN fluid-mpi vcluster {self.name}", f"# END fluid-mpi vcluster {self.name}"
        text = HOSTS_FILE.read_text() if HOSTS_FILE.exists() else ""
        kept, inside = [], False
        for line in text.splitlines():
            if line in (begin, end):
                inside = line == begin
            elif not inside:
                kept.append(line)
        new = "\n".join(kept + ([begin, *lines, end] if lines else [])) + "\n"
        if new != text:
            HOSTS_FILE.write_text(new)

    def namespaces(self) -> list[str]:
        """Every network namespace of this instance that exists now (hosts and switch)."""
        out = _run(["ip", "netns", "list"]).stdout
        return [line.split()[0] for line in out.splitlines() if line.startswith(f"{self.name}-")]

    def pids(self, host: str) -> list[int]:
        """Processes in ``host``: in its network namespace or in its cgroups."""
        found = set(int(p) for p in _run(["ip", "netns", "pids", self.ns(host)], check=False).stdout.split())
        for ctl in CONTROLLERS:
            try:
                found.update(int(p) for p in (self.cgroup(ctl, host) / "cgroup.procs").read_text().split())
            except OSError:
                pass
        return sorted(found)

    def _kill(self, pids: list[int]) -> None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(POLL)

    def down(self) -> None:
        """Remove everything of this instance: processes, namespaces, cgroups, /etc/hosts block, state."""
        _check_root()
        host_names = {ns[len(self.name) + 1:] for ns in self.namespaces()} - {"sw"}
        for ctl in CONTROLLERS:
            if self.cgroup(ctl).is_dir():
                host_names |= {p.name for p in self.cgroup(ctl).iterdir() if p.is_dir()}
        for host in host_names:  # SIGKILL does not reach a task in a frozen v1 cgroup until it is thawed
            _write(self.cgroup("freezer", host) / "freezer.state", "THAWED")
        self._kill([p for host in host_names for p in self.pids(host)])
        for ns in self.namespaces():
            _run(["ip", "netns", "del", ns], check=False)
        for ctl in CONTROLLERS:
            for path in ([self.cgroup(ctl, h) for h in host_names] + [self.cgroup(ctl)]):
                deadline = time.monotonic() + SETTLE_TIMEOUT  # rmdir is EBUSY until killed tasks are gone
                while path.is_dir():
                    try:
                        path.rmdir()
                    except OSError:
                        if time.monotonic() > deadline:
                            raise VClusterError(f"cannot remove cgroup {path}: processes remain") from None
                        time.sleep(POLL)
        self._hosts_block([])
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- faults ------------------------------------------------------------------------------------
    def _set(self, host: str, **changes: object) -> None:
        """Record ``changes`` for ``host``; its switch port (and the agent) follow powered + cable."""
        state = self._require(host)
        h = state["hosts"][host]
        h.update(changes)
        reachable = h["powered"] and h["cable"] == "up"
        _run(["ip", "-n", self.switch, "link", "set", self.veth(host), "up" if reachable else "down"])
        marker = self.dir / "unreachable" / host
        marker.unlink(missing_ok=True) if reachable else marker.touch()
        self._save(state)

    def cable(self, host: str, up: bool) -> None:
        """Plug in (``up``) or pull out the host's cable: its switch port goes up or down."""
        self._set(host, cable="up" if up else "down")

    def power(self, host: str, on: bool) -> None:
        """Off: link down and SIGKILL to every process in the host. On: link up (if the cable is), and the
        host empty, as after a reboot."""
        self._set(host, powered=on)
        _write(self.cgroup("freezer", host) / "freezer.state", "THAWED")  # a frozen task ignores SIGKILL
        self._kill(self.pids(host))

    def _control(self, host: str, ctl: str, knob: str) -> Path:
        """Adopt every process of ``host`` into its ``ctl`` cgroup (processes started without the agent
        too) and return the path of ``knob`` there."""
        self._require(host)
        path = self.cgroup(ctl, host) / knob
        if not path.exists():
            raise VClusterError(f"cgroup v1 {ctl} controller not available at {CGROUP_ROOT / ctl}")
        for pid in self.pids(host):
            _write(path.parent / "cgroup.procs", str(pid))
        return path

    def freeze(self, host: str, frozen: bool = True) -> None:
        """Stop (``frozen``) or continue every process in the host, through the cgroup v1 freezer: processes
        started there later by the agent freeze at once."""
        path = self._control(host, "freezer", "freezer.state")
        want = "FROZEN" if frozen else "THAWED"
        path.write_text(want)
        deadline = time.monotonic() + SETTLE_TIMEOUT  # FREEZING -> FROZEN once every task has stopped
        while path.read_text().strip() != want:
            if time.monotonic() > deadline:
                raise VClusterError(f"{host} did not reach {want} within {SETTLE_TIMEOUT:g} s")
            time.sleep(POLL)

    def slow(self, host: str, cpus: float) -> None:
        """Limit the host to ``cpus`` CPUs (CFS quota = cpus x period); 0 lifts the limit."""
        path = self._control(host, "cpu", "cpu.cfs_quota_us")
        period = int((path.parent / "cpu.cfs_period_us").read_text())
        path.write_text(str(max(1000, int(cpus * period)) if cpus else -1))  # the kernel's minimum quota: 1 ms
        state = self.load()
        state["hosts"][host]["cpus"] = cpus or None
        self._save(state)

    def shape(self, host: str | None, rate: str | None = None, delay: str | None = None,
              loss: float | None = None, clear: bool = False) -> list[str]:
        """Shape both directions of the host's link (all hosts when ``host`` is None): tbf for ``rate``,
        netem for ``delay``/``loss`` (each direction gets the delay); ``clear`` removes it. Returns hosts."""
        state = self._require(host)
        if not clear and rate is None and delay is None and loss is None:
            raise VClusterError("nothing to shape: give --rate, --delay, --loss or --clear")
        if rate is not None and not RATE_RE.match(rate):
            raise VClusterError(f"bad --rate {rate!r}: a number with bit, kbit, mbit or gbit (e.g. 100mbit)")
        if delay is not None and not DELAY_RE.match(delay):
            raise VClusterError(f"bad --delay {delay!r}: a number with us, ms or s (e.g. 20ms)")
        if loss is not None and not 0 <= loss <= 100:
            raise VClusterError(f"bad --loss {loss}: a percentage between 0 and 100")
        netem = [] if clear else (["delay", delay] if delay else []) + (["loss", f"{loss}%"] if loss else [])
        if netem or (not clear and (delay or loss is not None)):
            probe = _run(["tc", "-n", self.switch, "qdisc", "add", "dev", "br0", "root", "netem"], check=False)
            if probe.returncode:
                reason = (probe.stderr.strip().splitlines() or ["unknown error"])[0]
                raise VClusterError(f"netem is not available in this kernel (tc: {reason}): "
                                    "--delay/--loss cannot be emulated here; --rate works")
            _run(["tc", "-n", self.switch, "qdisc", "del", "dev", "br0", "root"])
        targets = [host] if host else list(state["hosts"])
        for name in targets:
            for ns, dev in ((self.switch, self.veth(name)), (self.ns(name), "eth0")):
                tc = ["tc", "-n", ns, "qdisc"]
                _run(tc + ["del", "dev", dev, "root"], check=False)  # none there yet is fine
                parent = ["root", "handle", "10:"]
                if netem:
                    _run(tc + ["add", "dev", dev, "root", "handle", "1:", "netem", *netem])
                    parent = ["parent", "1:1", "handle", "10:"]
                if rate and not clear:
                    value, unit = RATE_RE.match(rate).groups()
                    bits = float(value) * {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}[unit]
                    burst = max(3000, int(bits / 8 / 100))  # 10 ms of traffic, at least two full frames
                    _run(tc + ["add", "dev", dev, *parent, "tbf", "rate", rate, "burst", str(burst),
                               "latency", TBF_LATENCY])
            state["hosts"][name]["shape"] = None if clear else {"rate": rate, "delay": delay, "loss": loss}
        self._save(state)
        return targets

    def status(self) -> dict:
        """What exists: per host its address, namespace, link, power, cable, freezer, cpu limit, qdiscs, pids."""
        _check_root()
        state = self.load()
        if state is None:
            return {"name": self.name, "up": False, "namespaces": self.namespaces()}
        for host, h in state["hosts"].items():
            link = _run(["ip", "-n", self.switch, "-o", "link", "show", "dev", self.veth(host)], check=False)
            frozen = self.cgroup("freezer", host) / "freezer.state"
            qdiscs = _run(["tc", "-n", self.switch, "qdisc", "show", "dev", self.veth(host)], check=False)
            h.update(namespace=self.ns(host), veth=self.veth(host), pids=self.pids(host),
                     link="up" if ",UP" in link.stdout.split(">")[0] else "down",
                     frozen=frozen.exists() and frozen.read_text().strip() != "THAWED",
                     qdiscs=[re.sub(r" refcnt \d+", "", q).strip() for q in qdiscs.stdout.splitlines() if "noqueue" not in q])
        return {"up": True, "agent": agent_path(self.name), **state}


def _check_root() -> None:
    if os.geteuid() != 0:
        raise VClusterError("vcluster needs root (network namespaces, cgroups, /etc/hosts)")
