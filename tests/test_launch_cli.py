"""`fluid-mpi launch` without MPI or root: hostfiles, agents and probes (hosts.py), the events and
predictions files and the mpirun command (runner.py), the preflight, and the whole command driven by a
fake mpirun and a fake agent."""
from __future__ import annotations

import json
import os
import stat
import sys

from click.testing import CliRunner

from fluid_mpi.cluster import hosts as hostlib
from fluid_mpi.cluster.runner import AttemptFiles, FileOutputs, MpirunLauncher, read_indices
from fluid_mpi.cluster.mpirun import sweep_sessions_here


# --- hosts.py ---------------------------------------------------------------------------------------

def test_parse_hostfile_text():
    text = "# pis\nnode1 slots=1\nnode2 slots=2 max_slots=4  # two\n\nnode1\n"
    assert hostlib.parse_hostfile_text(text) == [hostlib.HostSlot("node1", 2), hostlib.HostSlot("node2", 2)]


def test_agent_and_remote_argv():
    assert hostlib.agent_command({"PRTE_MCA_plm_ssh_agent": "/run/x/agent -v"}) == ["/run/x/agent", "-v"]
    ssh = hostlib.agent_command({})
    assert ssh[0] == "ssh" and "BatchMode=yes" in ssh and any(a.startswith("ConnectTimeout") for a in ssh)
    assert hostlib.remote_argv("h", ["echo", "x y"], ["a"]) == ["a", "h", "echo 'x y'"]


def test_probe_and_kill_marked_with_fake_runner():
    calls = []

    def run(argv, timeout):
        calls.append(argv)
        return (0, "") if argv[1] == "up" else (None, "no answer")
    assert hostlib.probe_many(["agent"], ["up", "down"], run=run) == {"up": True, "down": False}
    calls.clear()
    hostlib.kill_marked(["agent"], ["up"], "fluid_run=abc", run=run)
    assert calls == [["agent", "up", "pkill --ns $$ --nslist net -KILL -f '[f]luid_run=abc'"]]


def test_sweep_sessions_removes_only_dead_daemons_directories(tmp_path):
    """The sweep (run here by a local shell, as the agent runs it on a host) removes prted.PID of a
    process that is gone, and keeps a live daemon's and anything else."""
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    for name in (f"prted.{gone.pid}", f"ompi.{gone.pid}", f"prted.{os.getpid()}", f"ompi.{os.getpid()}",
                 "prted.x", "other"):
        (tmp_path / name / "0").mkdir(parents=True)

    def run(argv, timeout):  # what the agent would do on the host: run the line in a shell
        done = subprocess.run(["sh", "-c", argv[2]], env={**os.environ, "TMPDIR": str(tmp_path)}, timeout=timeout)
        return done.returncode, ""
    assert hostlib.sweep_sessions(["agent"], ["h"], run=run) == {"h": 0}
    kept = [f"prted.{os.getpid()}", f"ompi.{os.getpid()}", "prted.x", "other"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    (tmp_path / f"ompi.{gone.pid}").mkdir()  # and here, where mpirun starts
    sweep_sessions_here({**os.environ, "TMPDIR": str(tmp_path)})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_preflight_problems_one_line_per_problem():
    facts = {"node1": {"fluid_mpi": "0.1.0", "ompi": "5.0.11", "missing": []},
             "node2": "unreachable (no answer within 2 s)",
             "node3": {"fluid_mpi": "0.0.9", "ompi": "5.0.11", "missing": ["/p/part-1.pt"]}}
    assert hostlib.preflight_problems(facts, "0.1.0", "5.0.11") == [
        "node2: unreachable (no answer within 2 s)", "node3: fluid-mpi 0.0.9 (here: 0.1.0)",
        "node3: missing /p/part-1.pt"]


def test_needed_paths(tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    assert hostlib.needed_paths(str(parts), 2, 3) == [str(parts / f"part-{j}.pt") for j in range(3)]
    assert hostlib.needed_paths(str(parts), 5, 2) == [str(parts / f"part-{j}.pt") for j in range(2)]
    assert hostlib.needed_paths(str(tmp_path / "m.pt"), 3, 4) == [str(tmp_path / "m.pt")]


# --- runner.py file helpers and the command line ---------------------------------------------------

def test_attempt_files_fence_and_event_copy(tmp_path):
    """Each attempt gets its own files; the record points to the current one; a stale attempt's writes
    are not seen; infer's events are copied into the one events file, complete lines only."""
    rec, evs = tmp_path / "p.jsonl", tmp_path / "e.jsonl"
    rec.write_text('{"index": 1}\n{"index": 2}\n{"index": 1}\n{"index": 3')  # a repeat, a torn line
    files = AttemptFiles(rec, evs, tmp_path)
    out = FileOutputs(files)
    assert out.new_events() == []
    p1, e1 = files.begin(1)
    assert rec.is_symlink() and read_indices(rec) == ({1, 2}, 0) and out.answered() == 2
    with open(e1, "a") as fh:
        fh.write('{"event": "start"}\n{"event": "to')
    assert [e["event"] for e in out.new_events()] == ["start"]
    with open(e1, "a") as fh:
        fh.write('rn"}\n')
    assert [e["event"] for e in out.new_events()] == ["torn"]
    p2, e2 = files.begin(2)
    with open(p1, "a") as fh:  # an orphan of attempt 1 writes on
        fh.write('{"index": 2}\n')
    with open(e1, "a") as fh:
        fh.write('{"event": "takeover"}\n')
    with open(p2, "a") as fh:
        fh.write('{"index": 3}\n')
    assert out.new_events() == [] and read_indices(rec) == ({1, 2, 3}, 0) and out.progress() > 0
    files.finish()
    assert not rec.is_symlink() and read_indices(rec) == ({1, 2, 3}, 0) and not p1.exists()
    assert [json.loads(x)["event"] for x in evs.read_text().splitlines()] == ["start", "torn"]


def test_mpirun_command_has_marker_and_flags(tmp_path):
    files = AttemptFiles(tmp_path / "p.jsonl", tmp_path / "e.jsonl", tmp_path)
    lau = MpirunLauncher("/v/mpirun", ["--checkpoint", "/c.pt"], files, "abc123", ["agent"], {})
    cmd = lau.command(["node1", "node3"], 2)
    assert cmd[:5] == ["/v/mpirun", "--hostfile", str(tmp_path / "hosts-2"), "-np", "2"]
    assert "--with-ft" in cmd and "tcp,self" in cmd and "^han" in cmd and "node" in cmd
    assert cmd[cmd.index("-X") + 1] == "fluid_run=abc123"
    assert cmd[cmd.index("--resume"):] == ["--resume", "--predictions", str(tmp_path / "predictions-2.jsonl"),
                                           "--events", str(tmp_path / "events-2.jsonl"),
                                           "--summary", str(tmp_path / "infer-2.json")]
    assert (tmp_path / "hosts-2").read_text() == "node1 slots=1\nnode3 slots=1\n"


def _fake_agent(tmp_path, down=()):
    """An agent that runs commands here for every host but those in `down` (exit 255 like ssh)."""
    agent = tmp_path / "agent"
    cases = "".join(f'  {h}) echo "ssh: connect to host {h}: No route to host" >&2; exit 255;;\n' for h in down)
    agent.write_text(f'#!/bin/sh\nhost="$1"; shift\ncase "$host" in\n{cases}esac\nexec sh -c "$*"\n')
    agent.chmod(agent.stat().st_mode | stat.S_IEXEC)
    return str(agent)


def test_launch_preflight_names_unreachable_host(tmp_path, monkeypatch):
    from fluid_mpi.cli import cli

    (tmp_path / "hosts").write_text("node1 slots=1\nnode2 slots=1\n")
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"x")
    monkeypatch.setenv("PRTE_MCA_plm_ssh_agent", _fake_agent(tmp_path, down=["node2"]))
    monkeypatch.setenv("MPIEXEC", sys.executable)  # never run: the preflight fails first
    res = CliRunner().invoke(cli, ["launch", "-np", "2", "--hostfile", str(tmp_path / "hosts"), "-c", str(ckpt),
                                   "--run-dir", str(tmp_path / "run")])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "node2" in lines[0] and "unreachable" in lines[0]


def test_launch_preflight_missing_part_file(tmp_path, monkeypatch):
    from fluid_mpi.cli import cli

    (tmp_path / "hosts").write_text("node1\nnode2\n")
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "part-0.pt").write_bytes(b"x")
    monkeypatch.setenv("PRTE_MCA_plm_ssh_agent", _fake_agent(tmp_path))
    res = CliRunner().invoke(cli, ["launch", "-np", "2", "--hostfile", str(tmp_path / "hosts"), "-c", str(parts),
                                   "--run-dir", str(tmp_path / "run")])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [f"fluid-mpi launch: error: node2: missing {parts / 'part-1.pt'}"]
    assert os.path.exists(parts / "part-0.pt")


# --- the whole command with a fake mpirun and a fake agent (no MPI, no root) ------------------------

FAKE_MPIRUN = r'''#!PYTHON
"""Stands in for mpirun: answers inputs like infer would; while DIR/lose names a host of this attempt,
answers 300 inputs, 'powers that host off' (DIR/down/HOST) and ends without a stop event, as PRRTE does."""
import json, os, sys, time
argv = sys.argv
opt = lambda name: argv[argv.index(name) + 1]
hosts = open(opt("--hostfile")).read().split()[::2]
preds, events, state = opt("--predictions"), opt("--events"), os.path.dirname(os.environ["FAKE_STATE"] + "/")
done = set()
if os.path.exists(preds):
    done = {json.loads(line)["index"] for line in open(preds)}
emit = lambda **ev: open(events, "a").write(json.dumps({"t": time.time(), **ev}) + "\n")
emit(event="start", ranks=len(hosts), family="fluid", mode="ht", images=1000, todo=1000 - len(done))
lose = open(state + "/lose").read().strip() if os.path.exists(state + "/lose") else ""
todo = [i for i in range(1000) if i not in done]
if lose in hosts:
    todo = todo[:300]
with open(preds, "a") as fh:
    for i in todo:
        fh.write(json.dumps({"index": i, "label": 0, "pred": 0, "rank": 0}) + "\n")
if lose in hosts:
    os.makedirs(state + "/down", exist_ok=True)
    open(state + "/down/" + lose, "w").close()
    sys.exit(0)
emit(event="stop", status="ok", answered=1000, images=1000, exit_code=0, message="", silent_hosts=[])
'''


def _fake_cluster(tmp_path, lose: str = ""):
    state = tmp_path / "state"
    (state / "down").mkdir(parents=True)
    (state / "lose").write_text(lose)
    mpirun = tmp_path / "mpirun"
    mpirun.write_text(FAKE_MPIRUN.replace("PYTHON", sys.executable))
    mpirun.chmod(0o755)
    agent = tmp_path / "agent"
    agent.write_text(f'#!/bin/sh\nhost="$1"; shift\n[ -e {state}/down/"$host" ] && exit 255\nexec sh -c "$*"\n')
    agent.chmod(0o755)
    (tmp_path / "hosts").write_text("node1 slots=1\nnode2 slots=1\n")
    (tmp_path / "m.pt").write_bytes(b"x")
    env = dict(os.environ, MPIEXEC=str(mpirun), PRTE_MCA_plm_ssh_agent=str(agent), FAKE_STATE=str(state))
    return env


def _launch(tmp_path, env, *extra):
    import subprocess

    # --no-warm: the fake agent runs every "host" in this one network namespace, where only one warm process
    # per run can bind its socket (the second never gets ready and the first attempt waited 30 s for it);
    # warm starts are tested in test_warm.py and on the virtual cluster
    cmd = [sys.executable, "-m", "fluid_mpi.cli", "launch", "-np", "2", "--hostfile", str(tmp_path / "hosts"),
           "-c", str(tmp_path / "m.pt"), "--run-dir", str(tmp_path / "run"), "--no-warm", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)  # a few seconds


def test_launch_relaunches_after_lost_daemon_fake_mpirun(tmp_path):
    env = _fake_cluster(tmp_path, lose="node2")
    res = _launch(tmp_path, env)
    assert res.returncode == 0, res.stderr
    assert "1000 of 1000 inputs answered" in res.stdout
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [a["hosts"] for a in s["attempts"]] == [["node1", "node2"], ["node1"]] and s["duplicates"] == 0
    assert [(f["host"], f["fault"]) for f in s["failures"]] == [("node2", "lost daemon")]
    assert read_indices(tmp_path / "run" / "predictions.jsonl") == (set(range(1000)), 0)


def test_launch_gives_up_with_resume_line_then_resumes(tmp_path):
    env = _fake_cluster(tmp_path, lose="node1")
    (tmp_path / "hosts").write_text("node1 slots=1\n")  # its only device is lost: nothing to relaunch on
    res = _launch(tmp_path, env, "--max-restarts", "0")
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 3 and "300 of 1000 inputs answered" in last and last.endswith("--resume")
    again = last.split("resume with: ", 1)[1].split()
    (tmp_path / "state" / "lose").write_text("")
    os.remove(tmp_path / "state" / "down" / "node1")  # the device is back
    import subprocess

    res = subprocess.run([sys.executable, "-m", "fluid_mpi.cli", *again[1:]], env=env, capture_output=True,
                         text=True, timeout=60)  # a few seconds
    assert res.returncode == 0, res.stderr
    assert read_indices(tmp_path / "run" / "predictions.jsonl") == (set(range(1000)), 0)


def test_resume_command_keeps_every_option_the_user_gave(tmp_path):
    """The printed resume command, parsed by launch itself, gives back every option of the run (each at
    a value other than its default) and the options meant for infer, with --resume added."""
    from fluid_mpi.cli.launch import launch, resume_command

    argv = ["-np", "3", "--hostfile", str(tmp_path / "h"), "--checkpoint", str(tmp_path / "c.pt"),
            "--max-restarts", "7", "--run-dir", str(tmp_path / "rd"), "--predictions", str(tmp_path / "p.jsonl"),
            "--events", str(tmp_path / "e.jsonl"), "--summary", str(tmp_path / "s.json"),
            "--rank-timeout", "2.5", "--stall-timeout", "44", "--stop-grace", "1.5", "--probe-interval", "0.3",
            "--mpirun-arg", "--mca", "--mpirun-arg", "btl_tcp_if_include=eth1", "--no-warm", "--data-address", "head",
            "--mode", "ha", "--batch-size", "16"]
    ctx = launch.make_context("launch", list(argv))
    defaults = launch.make_context("launch", ["-np", "1", "--hostfile", "h", "--checkpoint", "c"]).params
    differs = {k for k in ctx.params if ctx.params[k] != defaults[k]}
    assert differs == set(ctx.params) - {"resume"}, "every option must be set to a non-default value"
    again = resume_command(launch, ctx.params, ctx.args)
    assert again[:2] == ["fluid-mpi", "launch"] and again[-1] == "--resume"
    back = launch.make_context("launch", again[2:])
    assert back.params == dict(ctx.params, resume=True)
    assert back.args == ["--mode", "ha", "--batch-size", "16"]
    # --warm is the default: it is written out too, so the command means the same whatever the default
    ctx = launch.make_context("launch", ["-np", "1", "--hostfile", "h", "--checkpoint", "c"])
    assert "--warm" in resume_command(launch, ctx.params, [])
