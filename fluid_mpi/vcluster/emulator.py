"""Virtual cluster (root only): host H of instance NAME is a network namespace ``NAME-H``, its ``eth0`` wired
to a bridge in a switch namespace ``NAME-sw``, its processes in cgroup v1 ``fluid-mpi-NAME/H`` (cpu, freezer,
cpuset: limits.py); a launch agent stands in for ssh (``AGENT H CMD...`` joins H's cgroups and runs CMD in H
under H's own hostname)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
from pathlib import Path

from .limits import CGROUP_ROOT, CONTROLLERS, HostLimits, settle
from .links import VClusterError, _run, shape_links

SUBNET, PREFIX_LEN = "10.213.0", 24  # private /24 used only inside the namespaces we create
HEAD, HEAD_OCTET, MAX_NODES, DEFAULT_NAME = "head", 254, 200, "fmpi"
NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")  # short: "NAME-254" must fit a 15-character interface name
STATE_ROOT, HOSTS_FILE = Path("/run/fluid-mpi-vcluster"), Path("/etc/hosts")
AGENT = """#!/bin/sh
# fluid-mpi vcluster {name}: launch agent standing in for ssh (agent HOST CMD...); a frozen HOST freezes it too
host="$1"; shift
case "$host" in {hosts}) ;; *) echo "ssh: Could not resolve hostname $host" >&2; exit 255;; esac
[ -e "{state}/unreachable/$host" ] && {{ echo "ssh: connect to host $host port 22: No route to host" >&2; exit 255; }}
for d in {cgroups}; do [ -d "$d/$host" ] && {{ echo $$ > "$d/$host/cgroup.procs" || exit 255; }}; done
export TMPDIR="{state}/tmp/$host"; mkdir -p "$TMPDIR"  # the host's own /tmp, emptied by power-on
export PRTE_MCA_plm_ssh_agent="{state}/agent"  # mpirun or `fluid-mpi launch` in a host reaches the others so
exec ip netns exec "{name}-$host" unshare --uts sh -c "hostname $host; $*"
"""


def resolve_name(name: str | None = None) -> str:
    """The instance name: ``name``, else $FLUID_MPI_VCLUSTER, else ``fmpi``; 1-8 of [a-z0-9]."""
    name = name or os.environ.get("FLUID_MPI_VCLUSTER") or DEFAULT_NAME
    if not NAME_RE.match(name):
        raise VClusterError(f"bad vcluster name {name!r}: 1-8 characters, a-z then a-z/0-9")
    return name


def agent_path(name: str | None = None) -> str:
    """Path of the launch agent (PRRTE's ``plm_ssh_agent``) of instance ``name``."""
    return str(STATE_ROOT / resolve_name(name) / "agent")


def mpirun_env(base: dict, name: str | None = None) -> dict:
    """``base`` plus what ``mpirun --hostfile F`` needs to start its daemons through the agent (run the venv's
    mpirun by its absolute path: PRRTE then passes its prefix on to the remote ``prted``)."""
    root = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"} if os.geteuid() == 0 else {}
    # HOME: without it opal_init fails with "Unable to get the user home directory"
    return {"HOME": "/root", **base, **root, "PRTE_MCA_plm_ssh_agent": agent_path(name)}


def hosts(name: str | None = None, include_head: bool = False) -> list[str]:
    """Hosts of the running instance in hostfile order, then ``head`` if asked for; [] when it is not up."""
    state = _load(STATE_ROOT / resolve_name(name) / "state.json")
    return [h for h in state["hosts"] if include_head or h != HEAD] if state else []


def _load(path: Path) -> dict | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text())
    return None


class VCluster(HostLimits):
    """One instance of the virtual cluster; its state lives in ``/run/fluid-mpi-vcluster/NAME/``."""

    def __init__(self, name: str | None = None):
        if os.geteuid() != 0:
            raise VClusterError("vcluster needs root (network namespaces, cgroups, /etc/hosts)")
        self.name = resolve_name(name)
        self.dir, self.switch = STATE_ROOT / self.name, f"{self.name}-sw"
        self.state_file = self.dir / "state.json"

    def ns(self, host: str) -> str:
        """Network namespace of ``host``."""
        return f"{self.name}-{host}"

    def veth(self, host: str) -> str:
        """Switch-side end of ``host``'s cable ``NAME-i`` (the host side is ``eth0`` with address SUBNET.i)."""
        return f"{self.name}-{HEAD_OCTET if host == HEAD else host[4:]}"

    def cgroup(self, controller: str, host: str | None = None) -> Path:
        """cgroup v1 directory of the instance (or of ``host``) under ``controller``."""
        return CGROUP_ROOT / controller / f"fluid-mpi-{self.name}" / (host or "")

    def require(self, host: str | None = None) -> dict:
        """The state, after checking that the instance is up and has ``host`` (if given)."""
        state = _load(self.state_file)
        if state is None:
            raise VClusterError(f"no virtual cluster {self.name!r}: run `fluid-mpi vcluster up N --hostfile F`")
        if host is not None and host not in state["hosts"]:
            raise VClusterError(f"no host {host!r} in vcluster {self.name!r} (hosts: {', '.join(state['hosts'])})")
        return state

    def up(self, n: int, hostfile: str, head: bool = False) -> bool:
        """Make node1..nodeN (and ``head``), write ``hostfile``; False (no-op) if that shape is up; else rebuild."""
        if not 1 <= n <= MAX_NODES:
            raise VClusterError(f"N must be between 1 and {MAX_NODES}, not {n}")
        names = [f"node{i}" for i in range(1, n + 1)] + ([HEAD] if head else [])
        existed = list((_load(self.state_file) or {"hosts": []})["hosts"]) == names
        Path(hostfile).write_text("".join(f"{h} slots=1\n" for h in names if h != HEAD))  # first: may fail
        if not existed:
            self.down()
            try:
                self._make(names)
            except BaseException:
                self.down()
                raise
        return not existed

    def _make(self, names: list[str]) -> None:
        try:
            _run(["ip", "netns", "add", self.switch])
        except VClusterError as exc:
            raise VClusterError(f"network namespaces refused here ({exc})") from None
        (self.dir / "unreachable").mkdir(parents=True, exist_ok=True)
        sw = ["ip", "-n", self.switch, "link"]
        _run(sw + ["add", "br0", "type", "bridge"])
        _run(sw + ["set", "br0", "up"])
        hosts_state = {}
        for host in names:
            ns, veth, addr = self.ns(host), self.veth(host), f"{SUBNET}.{self.veth(host).split('-')[1]}"
            _run(["ip", "netns", "add", ns])
            _run(sw + ["add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
            _run(sw + ["set", veth, "master", "br0", "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{addr}/{PREFIX_LEN}", "dev", "eth0"])
            for dev in ("lo", "eth0"):
                _run(["ip", "-n", ns, "link", "set", dev, "up"])
            for ctl in (c for c in CONTROLLERS if (CGROUP_ROOT / c / "cgroup.procs").exists()):
                for d in (self.cgroup(ctl), self.cgroup(ctl, host)):
                    d.mkdir(exist_ok=True)
                    if ctl == "cpuset":  # a new v1 cpuset has no CPUs and no memory nodes: nothing can join it
                        for knob in ("cpuset.cpus", "cpuset.mems"):
                            (d / knob).write_text((d.parent / knob).read_text())
            hosts_state[host] = {"addr": addr, "powered": True, "cable": "up", "cpus": None, "cores": None}
        # The agent reaches the hosts' cgroups through bind mounts in the state directory: an agent started
        # inside a host (mpirun in head launching the daemons) runs under `ip netns exec`, which remounts
        # /sys, so /sys/fs/cgroup is empty there. Through it, the agent left every rank in head's cgroups,
        # and `slow` never bound them (bench cluster rows "0.25 CPU per host" ran at full speed, 0 % of
        # their periods throttled).
        for ctl in (c for c in CONTROLLERS if self.cgroup(c).is_dir()):
            view = self._cgroup_view(ctl)
            view.mkdir(parents=True, exist_ok=True)
            if not os.path.ismount(view):
                _run(["mount", "--bind", str(self.cgroup(ctl)), str(view)])
        agent = Path(agent_path(self.name))
        cgroups = " ".join(str(self._cgroup_view(c)) for c in CONTROLLERS if self.cgroup(c).is_dir())
        agent.write_text(AGENT.format(name=self.name, hosts="|".join(names), state=self.dir, cgroups=cgroups))
        agent.chmod(0o755)
        self._hosts_block([f"{h['addr']} {host}" for host, h in hosts_state.items()])
        state = {"name": self.name, "subnet": f"{SUBNET}.0/{PREFIX_LEN}", "hosts": hosts_state}
        self.state_file.write_text(json.dumps(state, indent=1))

    def _hosts_block(self, lines: list[str]) -> None:
        # replaces (with no lines: removes) this instance's block; in place, as /etc/hosts may be a bind mount
        tag = f"fluid-mpi vcluster {self.name}"
        text = HOSTS_FILE.read_text() if HOSTS_FILE.exists() else ""
        new = re.sub(rf"^# BEGIN {tag}\n.*?^# END {tag}\n", "", text, flags=re.M | re.S)
        if lines:
            new = new.rstrip("\n") + "\n" + "\n".join([f"# BEGIN {tag}", *lines, f"# END {tag}"]) + "\n"
        if new != text:
            HOSTS_FILE.write_text(new)

    def namespaces(self) -> list[str]:
        """Every network namespace of this instance that exists now (hosts and switch)."""
        listing = _run(["ip", "netns", "list"]).stdout.splitlines()
        return [line.split()[0] for line in listing if line.startswith(f"{self.name}-")]

    def pids(self, host: str) -> list[int]:
        """Processes in ``host``: in its network namespace or in its cgroups."""
        found = {int(p) for p in _run(["ip", "netns", "pids", self.ns(host)], check=False).stdout.split()}
        for ctl in CONTROLLERS:
            with contextlib.suppress(OSError):
                found.update(int(p) for p in (self.cgroup(ctl, host) / "cgroup.procs").read_text().split())
        return sorted(found)

    def _kill(self, hosts_: list[str]) -> None:
        for host in hosts_:  # SIGKILL does not reach a task in a frozen v1 cgroup until it is thawed
            with contextlib.suppress(OSError):
                (self.cgroup("freezer", host) / "freezer.state").write_text("THAWED")
        for pid in [p for host in hosts_ for p in self.pids(host)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        settle(lambda: not any(self.pids(host) for host in hosts_))  # a zombie is in neither list

    def _cgroup_view(self, controller: str) -> Path:
        """Where the agent sees the instance's cgroup under ``controller``: a bind mount (see :meth:`up`)."""
        return self.dir / "cgroup" / controller

    def down(self) -> None:
        """Remove everything of this instance: processes, namespaces, cgroups (and their bind mounts),
        /etc/hosts block, state."""
        names = {ns[len(self.name) + 1:] for ns in self.namespaces()} - {"sw"}
        for top in (self.cgroup(c) for c in CONTROLLERS if self.cgroup(c).is_dir()):
            names |= {p.name for p in top.iterdir() if p.is_dir()}
        self._kill(sorted(names))
        for ns in self.namespaces():
            _run(["ip", "netns", "del", ns], check=False)
        for ctl in CONTROLLERS:  # before the cgroups go, and before the state directory is removed
            if os.path.ismount(self._cgroup_view(ctl)):
                _run(["umount", "-l", str(self._cgroup_view(ctl))], check=False)  # lazy: never busy
        for path in [self.cgroup(c, h) for c in CONTROLLERS for h in names] + [self.cgroup(c) for c in CONTROLLERS]:
            with contextlib.suppress(FileNotFoundError):
                path.rmdir()  # the killed tasks are gone (see _kill), so only a new stray one makes this fail
        self._hosts_block([])
        shutil.rmtree(self.dir, ignore_errors=True)

    def _set(self, host: str, **changes: object) -> None:
        # the switch port (and the agent) follow powered + cable
        state = self.require(host)
        h = state["hosts"][host]
        h.update(changes)
        linked = h["powered"] and h["cable"] == "up"
        _run(["ip", "-n", self.switch, "link", "set", self.veth(host), "up" if linked else "down"])
        # the agent stands for ssh on a management network of its own: only the data cable out, it still gets in
        reachable = h["powered"] and h["cable"] in ("up", "data-down")
        marker = self.dir / "unreachable" / host
        marker.unlink(missing_ok=True) if reachable else marker.touch()
        self.state_file.write_text(json.dumps(state, indent=1))

    def cable(self, host: str, up: bool, data_only: bool = False) -> None:
        """Plug in (``up``) or pull out the host's cable: its switch port goes up or down. ``data_only``:
        only the data network's cable is out; the agent (ssh on a management network) still reaches it."""
        self._set(host, cable="up" if up else "data-down" if data_only else "down")

    def power(self, host: str, on: bool) -> None:
        """Off: link down, SIGKILL to every process in the host. On: link up (if the cable is), host empty,
        its temporary files gone (as after a reboot: the killed daemons' session directories too)."""
        self._set(host, powered=on)
        self._kill([host])
        if on:
            shutil.rmtree(self.dir / "tmp" / host, ignore_errors=True)

    def shape(self, host: str | None, rate: str | None = None, delay: str | None = None,
              loss: float | None = None) -> list[str]:
        """Shape both directions of the host's link (all hosts when ``host`` is None): tbf for ``rate``, netem
        for ``delay`` (each way) and ``loss`` (percent); with none of them, remove the shaping. Returns the hosts."""
        return shape_links(self, host, rate, delay, loss)

    def status(self) -> dict:
        """What exists: hosts (address, power, cable, link, cpu limit, cores, freezer, root qdisc, pids), or up:
        False."""
        state = _load(self.state_file) or {"hosts": {}, "leftover_namespaces": self.namespaces()}
        for host, h in state["hosts"].items():
            tc = _run(["tc", "-n", self.switch, "qdisc", "show", "dev", self.veth(host), "root"], check=False).stdout
            frozen = self.cgroup("freezer", host) / "freezer.state"
            h.update(namespace=self.ns(host), link="up" if h["powered"] and h["cable"] == "up" else "down",
                     frozen=frozen.exists() and frozen.read_text().strip() != "THAWED", pids=self.pids(host),
                     qdisc=" ".join(re.sub(r" refcnt \d+", "", tc).split()) if "noqueue" not in tc else None)
        return {"name": self.name, "up": bool(state["hosts"]), "agent": agent_path(self.name), **state}
