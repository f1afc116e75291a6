"""``fluid-mpi launch``: the elastic launcher (click + stdlib at import time; the rest is imported when
the command runs). It checks every host, runs mpirun itself and relaunches on the hosts that answer
when a device is lost; see docs/cluster-elastic.md."""
from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import uuid
from pathlib import Path

import click

from ..errors import ExitCode


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"fluid-mpi launch: error: {message}", err=True)
    sys.exit(code)


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                 "help_option_names": ["-h", "--help"]})
@click.option("-np", "--np", "np_", type=click.IntRange(1), required=True, help="Ranks (devices) at most.")
@click.option("--hostfile", type=click.Path(dir_okay=False), required=True,
              help="Open MPI hostfile, one device per line, in rank order (the first one coordinates).")
@click.option("--checkpoint", "-c", required=True, envvar="FLUID_MPI_CHECKPOINT",
              help="Checkpoint file, or an export directory (every host then needs part-0..part-J).")
@click.option("--max-restarts", type=click.IntRange(0), default=3, show_default=True,
              help="Relaunches after failures before giving up (rejoins do not count).")
@click.option("--resume", is_flag=True, help="Go on from the predictions and events files of an earlier run.")
@click.option("--run-dir", type=click.Path(file_okay=False), default="runs/launch", show_default=True,
              help="Per-attempt hostfiles, mpirun logs and infer summaries; default home of the outputs.")
@click.option("--predictions", type=click.Path(dir_okay=False), default=None,
              help="Predictions (the record of what is answered). Default RUN_DIR/predictions.jsonl.")
@click.option("--events", type=click.Path(dir_okay=False), default=None,
              help="JSON-lines events of infer and of the launcher. Default RUN_DIR/events.jsonl.")
@click.option("--summary", type=click.Path(dir_okay=False), default=None,
              help="The launcher's JSON summary. Default RUN_DIR/summary.json.")
@click.option("--rank-timeout", type=click.FloatRange(0.1), default=10.0, show_default=True,
              help="infer's in-job silence deadline (seconds).")
@click.option("--stall-timeout", type=click.FloatRange(1), default=None,
              help="No answer and no event for this long: probe the hosts from outside and relaunch. "
                   "Default: 2 x --rank-timeout + 10 s (infer's own deadline should fire first).")
@click.option("--stop-grace", type=click.FloatRange(0), default=3.0, show_default=True,
              help="Seconds mpirun may linger after infer's stop event before its group is killed.")
@click.option("--probe-interval", type=click.FloatRange(0.1), default=1.0, show_default=True,
              help="Seconds between probes of lost hosts (rejoin).")
@click.option("--mpirun-arg", multiple=True, help="Extra mpirun argument (repeatable).")
@click.option("--data-address", default=None, metavar="HOST",
              help="How the hosts reach this host on the network MPI uses (a name or address): every probe "
                   "checks that a host can connect to it, not only that it runs a command. Default: this "
                   "host's name.")
@click.option("--warm/--no-warm", default=True, show_default=True,
              help="Keep one process per host with torch imported, from which every attempt's ranks are "
                   "forked (a relaunch then skips the import; costs one idle Python with torch per host).")
@click.pass_context
def launch(ctx: click.Context, np_: int, hostfile: str, checkpoint: str, max_restarts: int, resume: bool,
           run_dir: str, predictions: str | None, events: str | None, summary: str | None,
           rank_timeout: float, stall_timeout: float | None, stop_grace: float, probe_interval: float,
           mpirun_arg: tuple[str, ...], data_address: str | None, warm: bool) -> None:
    """Elastic inference: run `fluid-mpi infer` under mpirun on the hostfile's devices; when a device is
    lost (power cut, cable pulled, frozen) relaunch on the devices that answer, skipping the inputs
    already answered; take a device back when it answers again. Other options go to infer.

    Exit codes: 0 every input answered; 2 a host or an option is unusable (before any work); 3 stopped
    (restarts used up, too few devices, or infer could not go on) -- the last line gives the command that
    resumes; 130 interrupted (every rank on every host is killed).
    """
    from ..cluster import hosts as hostlib
    from ..cluster.data_path import DataPathListener
    from ..cluster.elastic import Clock, Driver, Settings
    from ..cluster.runner import AttemptFiles, FileOutputs, MpirunLauncher, launcher_events, read_indices
    from ..cluster.warm_pool import WarmPool
    from ..cluster.mpirun import find_mpirun, mpi_env

    run_path = Path(run_dir).resolve()
    # absolute, symlinks kept: during a run the record is a symlink to the attempt's file (runner.py)
    preds = Path(os.path.abspath(predictions or run_path / "predictions.jsonl"))
    evs = Path(os.path.abspath(events or run_path / "events.jsonl"))
    summ = Path(summary or run_path / "summary.json").resolve()
    for path in (run_path, preds.parent, evs.parent, summ.parent):
        path.mkdir(parents=True, exist_ok=True)
    try:
        slots = hostlib.parse_hostfile(hostfile)
    except (OSError, ValueError) as exc:
        _fail(f"hostfile: {exc}")
    mpirun = find_mpirun()
    if mpirun is None:
        _fail("no mpirun found: run scripts/setup.sh (it installs Open MPI 5 from PyPI)")
    names = [s.hostname for s in slots]
    agent = hostlib.agent_command()
    data_path = DataPathListener(data_address)
    probe_cmd = data_path.probe_command(sys.executable)
    try:
        problems = _preflight(hostlib, agent, names, checkpoint, np_)
        if not problems:
            reached = hostlib.probe_many(agent, names, cmd=probe_cmd)
            problems = [f"{h}: runs commands but cannot connect to {data_path.address}:{data_path.port} on the "
                        "network MPI uses (a data cable, a firewall, or give --data-address)"
                        for h in names if not reached[h]]
    except KeyboardInterrupt:  # nothing started yet; the preflight's probes end by their own timeout
        _fail("interrupted during the preflight", ExitCode.INTERRUPTED)
    if problems:
        for line in problems:
            click.echo(f"fluid-mpi launch: error: {line}", err=True)
        sys.exit(2)
    if not resume:  # a fresh run: earlier answers must not be skipped
        preds.unlink(missing_ok=True)
        evs.unlink(missing_ok=True)
    infer_args = ["--checkpoint", str(Path(checkpoint).resolve()), "--rank-timeout", str(rank_timeout),
                  *ctx.args]
    files = AttemptFiles(preds, evs, run_path)
    run_id = uuid.uuid4().hex[:12]
    env = mpi_env()
    env["FLUID_MPI_RUN_ID"] = run_id
    pool = WarmPool(agent, run_id, sys.executable, run_path) if warm else None
    launcher = MpirunLauncher(mpirun, infer_args, files, run_id, agent, env, mpirun_arg, warm=pool)
    emit = launcher_events(evs)
    stop_flag: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stop_flag.append(signum))
    settings = Settings(np=np_, max_restarts=max_restarts, probe_every=probe_interval, stop_grace=stop_grace,
                        stall_timeout=stall_timeout or 2 * rank_timeout + 10)
    driver = Driver(names, settings, launcher, FileOutputs(files),
                    lambda hs: hostlib.probe_many(agent, hs, cmd=probe_cmd), emit, Clock(), lambda: bool(stop_flag))
    try:
        if pool is not None:  # the first attempt waits for the imports it would do anyway
            pool.start(names)
            late = pool.wait_ready(names, settings.ready_wait, lambda: bool(stop_flag))
            if late:
                click.echo(f"fluid-mpi launch: note: no warm process ready on {', '.join(late)} after "
                           f"{settings.ready_wait:g} s; its ranks start cold", err=True)
        code, message = (ExitCode.INTERRUPTED, "interrupted") if stop_flag else driver.run()
    finally:
        if pool is not None:
            pool.close(names)
        data_path.close()
    if driver.lost:  # leave nothing behind on a lost host that can be reached again by now
        launcher.cleanup(sorted(driver.lost))
    files.finish()
    report = driver.summary(code, message)
    report["duplicates"] = read_indices(preds)[1]
    report.update(run_id=run_id, predictions=str(preds), events=str(evs))
    status = "ok" if code == 0 else "interrupted" if code == ExitCode.INTERRUPTED else "stopped"
    emit("launcher_stop", status=status, answered=report["answered"], images=report["images"])
    summ.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    of = f" of {report['images']}" if report["images"] is not None else ""
    if code == 0:
        click.echo(f"fluid-mpi launch: done: {report['answered']}{of} inputs answered, "
                   f"{len(report['failures'])} failure(s), {len(report['attempts'])} attempt(s); summary {summ}")
        return
    given = dict(ctx.params, hostfile=str(Path(hostfile).resolve()), checkpoint=str(Path(checkpoint).resolve()),
                 run_dir=str(run_path), predictions=str(preds), events=str(evs), summary=str(summ))
    again = resume_command(ctx.command, given, ctx.args)
    click.echo(f"fluid-mpi launch: {status}: {message}: {report['answered']}{of} inputs answered; "
               f"resume with: {shlex.join(again)}", err=True)
    sys.exit(128 + stop_flag[0] if stop_flag else code)


def _preflight(hostlib, agent: list[str], names: list[str], checkpoint: str, np_: int) -> list[str]:
    """Every host answers, has this fluid-mpi and Open MPI version, and the files it may need."""
    from concurrent.futures import ThreadPoolExecutor

    if not Path(checkpoint).exists():
        return [f"{os.uname().nodename}: missing {Path(checkpoint).resolve()}"]
    here = hostlib.local_facts()
    with ThreadPoolExecutor(max_workers=min(len(names), 16)) as pool:
        facts = pool.map(lambda ih: hostlib.host_facts(agent, ih[1], hostlib.needed_paths(
            checkpoint, ih[0], np_)), enumerate(names))
        return hostlib.preflight_problems(dict(zip(names, facts)), here["fluid_mpi"], here["ompi"])


def resume_command(command: click.Command, params: dict, extra: list[str]) -> list[str]:
    """``fluid-mpi launch`` again with every option of ``params`` (the values this run used: paths made
    absolute by the caller), the options meant for infer (``extra``) and ``--resume``: it goes on from
    where this run stopped. Built from the command's own option list, so no option can be left out."""
    argv = ["fluid-mpi", command.name or "launch"]
    for p in command.params:
        value = params.get(p.name)
        if not isinstance(p, click.Option) or p.name == "resume" or value is None:
            continue
        name = max(p.opts, key=len)
        if p.is_flag:
            if p.secondary_opts:  # --warm/--no-warm: say which
                argv.append(name if value else max(p.secondary_opts, key=len))
            elif value:
                argv.append(name)
            continue
        for v in (value if p.multiple else [value]):
            argv.append(f"{name}={v}")  # NAME=VALUE: a value that starts with '-' stays a value
    return argv + list(extra) + ["--resume"]
