"""The virtual cluster's links: the traffic-control queues (tc qdiscs) that emulate a slow, lossy or
distant link, built from the user's ``--rate``, ``--delay`` and ``--loss``; how ``ip`` and ``tc`` are run;
and the error every vcluster operation raises."""
from __future__ import annotations

import re
import shlex
import subprocess

from ..errors import FluidError

CMD_TIMEOUT = 15.0  # an ip/tc call takes milliseconds; the bound only guards against a wedged kernel call
TBF_LATENCY = "50ms"  # tbf queue bound: packets waiting longer are dropped, like a small switch buffer
RATE_RE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)$")


class VClusterError(FluidError):
    """A virtual-cluster operation is impossible (not root, namespaces refused, bad host, no cluster)."""


def qdisc_specs(rate: str | None, delay: str | None, loss: float | None) -> list[list[str]]:
    """The qdiscs of one direction of a link, root first: netem for ``delay`` and ``loss`` (percent), then
    tbf for ``rate``; [] (no shaping) when none is given."""
    specs = []
    if delay is not None or loss is not None:
        specs.append(["netem", *(["delay", delay] if delay else []), *(["loss", f"{loss}%"] if loss else [])])
    if rate is not None:
        match = RATE_RE.match(rate)
        if not match:
            raise VClusterError(f"bad --rate {rate!r}: a number with bit, kbit, mbit or gbit (e.g. 100mbit)")
        bits = float(match[1]) * {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}[match[2]]
        burst = max(3000, int(bits / 8 / 100))  # 10 ms of traffic, at least two full frames
        specs.append(["tbf", "rate", rate, "burst", str(burst), "latency", TBF_LATENCY])
    return specs


def _run(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=CMD_TIMEOUT)
    except FileNotFoundError:
        raise VClusterError(f"{args[0]} not found: install iproute2 (ip, tc) and util-linux (unshare)") from None
    except subprocess.TimeoutExpired:
        raise VClusterError(f"{shlex.join(args)}: no answer within {CMD_TIMEOUT:g} s") from None
    if check and proc.returncode:  # ip and tc say what is wrong on the first line of stderr
        raise VClusterError(f"{shlex.join(args)}: {(proc.stderr.strip().splitlines() or ['failed'])[0]}")
    return proc


def shape_links(vc, host: str | None, rate: str | None = None, delay: str | None = None,
                loss: float | None = None) -> list[str]:
    """Shape both directions of a host's link on virtual cluster ``vc`` (all hosts when ``host`` is None):
    see :meth:`~fluid_mpi.vcluster.emulator.VCluster.shape`. Returns the hosts."""
    state, specs = vc.require(host), qdisc_specs(rate, delay, loss)
    if specs and specs[0][0] == "netem":
        probe = _run(["tc", "-n", vc.switch, "qdisc", "add", "dev", "br0", "root", "netem"], check=False)
        if probe.returncode:  # tc: "Specified qdisc kind is unknown"
            raise VClusterError("netem is not in this kernel: --delay/--loss cannot be emulated (--rate can)")
        _run(["tc", "-n", vc.switch, "qdisc", "del", "dev", "br0", "root"])
    targets = [host] if host else list(state["hosts"])
    for name in targets:
        for ns, dev in ((vc.switch, vc.veth(name)), (vc.ns(name), "eth0")):
            _run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)  # none there yet is fine
            for i, spec in enumerate(specs, 1):  # netem at the root, tbf below it
                where = ["root"] if i == 1 else ["parent", f"{i - 1}:1"]
                _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, *where, "handle", f"{i}:", *spec])
    return targets
