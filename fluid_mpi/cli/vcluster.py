"""``fluid-mpi vcluster``: command-line front of :mod:`fluid_mpi.vcluster.emulator` (click + stdlib only)."""
from __future__ import annotations

import json
import os
import shlex
from typing import Callable

import click

from ..errors import FluidError
from ..vcluster import emulator as vc


class VClusterGroup(click.Group):
    """Every error of a vcluster command, usage errors included, is one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (FluidError, click.UsageError, OSError) as exc:  # OSError: e.g. an unwritable hostfile or cgroup fs
            message = exc.format_message() if isinstance(exc, click.UsageError) else str(exc)
            click.echo(f"fluid-mpi: error: {message}", err=True)
            ctx.exit(2)


def _cluster(ctx: click.Context) -> vc.VCluster:
    return vc.VCluster(ctx.obj)


HOST = click.argument("host")


@click.group(cls=VClusterGroup)
@click.option("--name", envvar="FLUID_MPI_VCLUSTER", default=vc.DEFAULT_NAME, show_default=True,
              help="Instance name (namespaces NAME-HOST, state in /run/fluid-mpi-vcluster/NAME). "
                   "Env: FLUID_MPI_VCLUSTER.")
@click.pass_context
def vcluster(ctx: click.Context, name: str) -> None:
    """Virtual cluster of emulated hosts on this machine (root): network namespaces on a bridge, each with
    its own hostname and address, and a launch agent for mpirun. Inject faults: power-off, cable, freeze,
    slow, pin, shape.

    \b
    fluid-mpi vcluster up 2 --hostfile hosts.txt
    fluid-mpi vcluster exec node1 -- env PRTE_MCA_plm_ssh_agent=/run/fluid-mpi-vcluster/fmpi/agent \\
        "$PWD/.venv/bin/mpirun" --allow-run-as-root --hostfile hosts.txt -np 2 --map-by node hostname

    More in docs/vcluster.md.
    """
    ctx.obj = vc.resolve_name(name)


@vcluster.command()
@click.argument("n", type=click.IntRange(1, vc.MAX_NODES))
@click.option("--hostfile", type=click.Path(dir_okay=False), required=True, help="Hostfile to write.")
@click.option("--head", is_flag=True, help="Also make a host 'head' (not in the hostfile) for mpirun.")
@click.pass_context
def up(ctx: click.Context, n: int, hostfile: str, head: bool) -> None:
    """Make hosts node1..nodeN (a cluster of another shape is torn down first; the same shape: no-op)."""
    made = _cluster(ctx).up(n, hostfile, head)
    names = vc.hosts(ctx.obj, include_head=True)
    click.echo(f"vcluster {ctx.obj}: {'up' if made else 'already up'}: {' '.join(names)}; hostfile {hostfile}; "
               f"agent {vc.agent_path(ctx.obj)}")


@vcluster.command()
@click.pass_context
def down(ctx: click.Context) -> None:
    """Remove every host, process, namespace, cgroup, /etc/hosts entry and the state of the instance."""
    _cluster(ctx).down()
    click.echo(f"vcluster {ctx.obj}: down")


@vcluster.command("exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@HOST
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def exec_(ctx: click.Context, host: str, cmd: tuple[str, ...]) -> None:
    """Run CMD inside HOST as ssh would (through the launch agent); its exit code is passed through."""
    _cluster(ctx).require(host)
    cmd = cmd[1:] if cmd[:1] == ("--",) else cmd  # click keeps the "--" after a positional argument
    if not cmd:
        raise click.UsageError("exec needs a command after HOST --")
    agent = vc.agent_path(ctx.obj)
    os.execv(agent, [agent, host, " ".join(shlex.quote(c) for c in cmd)])


def _host_command(name: str, doc: str, done: str, act: Callable[[vc.VCluster, str], None]) -> None:
    """Register ``fluid-mpi vcluster NAME HOST``: ``act`` on the host, then one line "HOST: DONE"."""

    @vcluster.command(name, help=doc)
    @HOST
    @click.pass_context
    def command(ctx: click.Context, host: str) -> None:
        act(_cluster(ctx), host)
        click.echo(f"{host}: {done}")


for _args in (("power-off", "SIGKILL to every process in HOST; its link down.", "powered off",
               lambda c, h: c.power(h, on=False)),
              ("power-on", "Bring HOST back empty, as after a reboot (link up unless its cable is out).",
               "powered on", lambda c, h: c.power(h, on=True)),
              ("freeze", "Stop every process in HOST (cgroup freezer; processes started later too).", "frozen",
               lambda c, h: c.freeze(h, True)),
              ("thaw", "Continue every process in HOST.", "thawed", lambda c, h: c.freeze(h, False))):
    _host_command(*_args)


@vcluster.command()
@HOST
@click.argument("state", type=click.Choice(["up", "down"]))
@click.option("--data-only", is_flag=True,
              help="Only the data network's cable: ssh (the launch agent) still reaches HOST, MPI's traffic does not.")
@click.pass_context
def cable(ctx: click.Context, host: str, state: str, data_only: bool) -> None:
    """Plug in (up) or pull out (down) HOST's network cable."""
    _cluster(ctx).cable(host, state == "up", data_only)
    click.echo(f"{host}: {'data ' if data_only else ''}cable {state}")


@vcluster.command()
@HOST
@click.option("--cpus", type=click.FloatRange(0, os.cpu_count() or 1), required=True,
              help="CPUs HOST may use (e.g. 0.5); 0 lifts the limit.")
@click.option("--period-ms", type=click.FloatRange(1, 1000), default=None,
              help="The quota's period (kernel default 100 ms: the host runs at full speed until its quota "
                   "is spent, then stops); 10 makes it evenly slower.")
@click.pass_context
def slow(ctx: click.Context, host: str, cpus: float, period_ms: float | None) -> None:
    """Limit HOST to F CPUs (cgroup cpu quota)."""
    _cluster(ctx).slow(host, cpus, period_ms)
    click.echo(f"{host}: {'cpu limit lifted' if not cpus else f'limited to {cpus:g} CPUs'}")


@vcluster.command()
@HOST
@click.argument("cores")
@click.pass_context
def pin(ctx: click.Context, host: str, cores: str) -> None:
    """Run HOST on CORES only (a cpuset list: 1, 0-1, 0,2), as a board has cores of its own; "all" undoes it."""
    _cluster(ctx).pin(host, None if cores == "all" else cores)
    click.echo(f"{host}: {'on every core' if cores == 'all' else f'pinned to cores {cores}'}")


@vcluster.command()
@click.argument("host", required=False)
@click.option("--rate", help="Bandwidth each way, tc units (e.g. 100mbit).")
@click.option("--delay", help="One-way delay each way (e.g. 20ms); needs netem in the kernel.")
@click.option("--loss", type=float, help="Packet loss percentage each way; needs netem in the kernel.")
@click.option("--clear", is_flag=True, help="Remove all shaping.")
@click.pass_context
def shape(ctx: click.Context, host: str | None, rate: str | None, delay: str | None, loss: float | None,
          clear: bool) -> None:
    """Shape HOST's link (all hosts without HOST): tbf for --rate, netem for --delay/--loss."""
    if clear == (rate is not None or delay is not None or loss is not None):
        raise click.UsageError("give --rate, --delay and/or --loss, or --clear alone")
    targets = _cluster(ctx).shape(host, rate, delay, loss)
    what = "cleared" if clear else ", ".join(f"{k} {v}" for k, v in
                                             (("rate", rate), ("delay", delay), ("loss %", loss)) if v is not None)
    click.echo(f"{' '.join(targets)}: shaping {what}")


@vcluster.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """What exists: hosts, addresses, link, power, freezer, cpu limit and cores, shaping, pids."""
    info = _cluster(ctx).status()
    if as_json:
        click.echo(json.dumps(info, indent=1))
    elif not info["up"]:
        left = " ".join(info["leftover_namespaces"])
        left = f" (leftover namespaces: {left}; `down` removes them)" if left else ""
        click.echo(f"vcluster {ctx.obj}: not up{left}")
    else:
        click.echo(f"vcluster {ctx.obj}: {info['subnet']}, agent {info['agent']}")
        for host, h in info["hosts"].items():
            cpus = f"{h['cpus']:g}" if h["cpus"] else "-"
            cpus += f" on cores {h['cores']}" if h.get("cores") else ""
            shaping, pids = (h["qdisc"] or "-").removeprefix("qdisc "), " ".join(map(str, h["pids"])) or "-"
            click.echo(f"{host:7} {h['addr']:14} link {h['link']:4} power {'on ' if h['powered'] else 'off'} "
                       f"cable {h['cable']:4} {'FROZEN' if h['frozen'] else 'running'} cpus {cpus} "
                       f"shaping {shaping} pids {pids}")
