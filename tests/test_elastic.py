"""The elastic launcher's decisions with fakes (no MPI, no processes): a fake clock, fake mpirun jobs that
follow a script, a fake prober; plus hostfile/agent/probe helpers and the CLI's preflight."""
from __future__ import annotations

import json
import os
import stat
import sys

import pytest
from click.testing import CliRunner

from fluid_mpi.cluster import hosts as hostlib
from fluid_mpi.cluster.elastic import Clock, Driver, Settings
from fluid_mpi.cluster.launch_cli import launch_summary as summary
from fluid_mpi.cluster.runner import FileOutputs, MpirunLauncher, read_indices

IMAGES = 1000


class World:
    """A fake cluster: time, which hosts answer probes, the answers written, the events file."""

    def __init__(self, hosts, scripts):
        self.t = 0.0
        self.up = {h: True for h in hosts}
        self.scripts = scripts  # attempt -> callable(world, job) giving the job's behaviour per tick
        self.answered: set[int] = set()
        self.events: list[dict] = []
        self.emitted: list[tuple[str, dict]] = []
        self.jobs: list[FakeJob] = []
        self.cleaned: list[list[str]] = []
        self.timers: list[tuple[float, callable]] = []

    # clock
    def now(self):
        return self.t

    def sleep(self, d):
        self.t = round(self.t + d, 6)
        for job in self.jobs:
            if job.code is None:
                job.tick()
        for at, fn in list(self.timers):
            if self.t >= at:
                self.timers.remove((at, fn))
                fn()

    # launcher
    def start(self, hosts, attempt):
        job = FakeJob(self, list(hosts), attempt, self.scripts[attempt])
        self.jobs.append(job)
        return job

    def cleanup(self, hosts):
        self.cleaned.append(list(hosts))

    # outputs
    def new_events(self):
        out, self.events = self.events, []
        return out

    def progress(self):
        return len(self.answered)

    def answered_count(self):
        return len(self.answered)

    def answer(self, n):
        start = len(self.answered)
        self.answered.update(range(start, min(start + n, IMAGES)))

    def probe(self, hosts):
        return {h: self.up[h] for h in hosts}

    def emit(self, event, **fields):
        self.emitted.append((event, fields))

    def driver(self, hosts, np_, **kw):
        outputs = type("O", (), {"new_events": lambda s: self.new_events(), "progress": lambda s: self.progress(),
                                 "answered": lambda s: self.answered_count()})()
        interrupted = kw.pop("interrupted", lambda: False)
        return Driver(hosts, Settings(np=np_, **kw), self, outputs, self.probe, self.emit,
                      Clock(self.now, self.sleep), interrupted)


class FakeJob:
    def __init__(self, world, hosts, attempt, script):
        self.world, self.hosts, self.attempt, self.script = world, hosts, attempt, script
        self.t0, self.code, self.killed_at, self.drained_at = world.t, None, None, None
        world.events.append({"event": "start", "ranks": len(hosts), "family": "fluid", "mode": "ht",
                             "images": IMAGES, "todo": IMAGES - len(world.answered)})

    def elapsed(self):
        return self.world.t - self.t0

    def tick(self):
        self.script(self.world, self)

    def poll(self):
        return self.code

    def drain(self):
        self.drained_at = self.world.t

    def kill(self):
        self.killed_at, self.code = self.world.t, -9

    def stop(self, code, **fields):
        self.world.events.append({"event": "stop", "exit_code": code, **fields})


def steady(rate=10, exit_after_stop=0.5):
    """Answers `rate` inputs per tick; after the last one writes stop 0 and exits after a while."""
    def script(w, job):
        if len(w.answered) < IMAGES:
            w.answer(rate)
            if len(w.answered) >= IMAGES:
                job.stop(0)
                job.done_at = w.t
        elif w.t - job.done_at >= exit_after_stop:
            job.code = 0
    return script


def lose_daemon(host, at):
    """Answers until `at` seconds, then `host` powers off and PRRTE ends the job (mpirun exit 0)."""
    def script(w, job):
        if job.elapsed() < at:
            w.answer(10)
        else:
            w.up[host] = False
            job.code = 0
    return script


def test_clean_run_one_attempt():
    w = World(["node1", "node2"], {1: steady()})
    code, msg = w.driver(["node1", "node2"], 2).run()
    assert code == 0 and len(w.answered) == IMAGES and len(w.jobs) == 1
    assert w.jobs[0].hosts == ["node1", "node2"] and w.jobs[0].killed_at is None


def test_power_off_relaunches_on_survivors_with_figures():
    w = World(["node1", "node2", "node3"], {1: lose_daemon("node2", 3.0), 2: steady()})
    d = w.driver(["node1", "node2", "node3"], 3)
    code, _ = d.run()
    assert code == 0 and len(w.answered) == IMAGES
    assert w.jobs[1].hosts == ["node1", "node3"]
    lost = [f for e, f in w.emitted if e == "host_lost"]
    assert lost == [{"host": "node2", "fault": "lost daemon", "detected_ms": pytest.approx(100, abs=60),
                     "excluded": True}]
    relaunch = [f for e, f in w.emitted if e == "relaunch"]
    assert relaunch == [{"hosts": ["node1", "node3"], "attempt": 2, "todo": pytest.approx(700, abs=10)}]
    rec = summary(d, code, "")["failures"][0]
    assert rec["host"] == "node2" and rec["next_answer_ms"] == pytest.approx(200, abs=110)
    assert w.cleaned[0] == ["node1", "node2", "node3"]


def test_coordinator_device_lost_next_host_coordinates():
    w = World(["node1", "node2"], {1: lose_daemon("node1", 1.0), 2: steady()})
    code, _ = w.driver(["node1", "node2"], 2).run()
    assert code == 0 and w.jobs[1].hosts == ["node2"]


@pytest.mark.parametrize("answers", [False, True])
def test_silent_host_from_infer_exit_4(answers):
    """Infer's silent host is a failure; excluded when it does not answer a probe (frozen board, cable
    pulled), cleaned up and used again when it does (one frozen rank on a live board)."""
    def silent(w, job):
        if job.elapsed() < 1.0:
            w.answer(10)
        elif job.code is None and not getattr(job, "stopped", False):
            job.stopped = True
            w.up["node2"] = answers
            w.events.append({"event": "failure", "host": "node2", "fault": "silent", "detected_ms": 2000.0})
            job.stop(4, silent_hosts=["node2"])  # mpirun lingers: killed at once after exit code 4
    w = World(["node1", "node2"], {1: silent, 2: steady()})
    d = w.driver(["node1", "node2"], 2)
    assert d.run()[0] == 0
    assert w.jobs[0].killed_at == pytest.approx(1.1, abs=0.15)
    assert [(f["fault"], f["excluded"]) for e, f in w.emitted if e == "host_lost"] == [("silent", not answers)]
    assert w.jobs[1].hosts == (["node1", "node2"] if answers else ["node1"])
    assert w.cleaned[0] == ["node1", "node2"]
    (rec,) = summary(d, 0, "")["failures"]  # infer's figures, one entry
    assert rec["seen_by"] == "infer+launcher" and rec["detected_ms"] == 2000.0
    assert 2000 < rec["next_answer_ms"] < 2500  # from the fault infer dated, to the relaunch's first answer


def test_lingering_mpirun_killed_after_grace():
    def linger(w, job):
        if len(w.answered) < IMAGES:
            w.answer(50)
            if len(w.answered) >= IMAGES:
                job.stop(0)
                job.stop_t = w.t
    w = World(["node1", "node2"], {1: linger})
    code, _ = w.driver(["node1", "node2"], 2, stop_grace=3.0).run()
    job = w.jobs[0]
    assert code == 0 and job.killed_at == pytest.approx(job.stop_t + 3.0, abs=0.25)


def test_unplugged_host_found_by_probes_ends_attempt():
    def hang(w, job):
        if job.elapsed() < 1.0:
            w.answer(10)
        else:
            w.up["node2"] = False  # cable pulled: the job hangs, the host does not answer probes
    w = World(["node1", "node2"], {1: hang, 2: steady()})
    d = w.driver(["node1", "node2"], 2, stall_timeout=30.0)
    assert d.run()[0] == 0
    assert w.jobs[0].killed_at == pytest.approx(2.0, abs=0.3)  # the probes at 1 s and 2 s missed
    assert [f["fault"] for e, f in w.emitted if e == "host_lost"] == ["silent"]
    assert w.jobs[1].hosts == ["node1"]


def test_stall_with_every_host_answering_relaunches_same_hosts():
    def hang(w, job):
        if job.elapsed() < 1.0:
            w.answer(10)
    w = World(["node1", "node2"], {1: hang, 2: steady()})
    assert w.driver(["node1", "node2"], 2, stall_timeout=5.0).run()[0] == 0
    assert w.jobs[0].killed_at == pytest.approx(6.0, abs=0.3)
    assert [j.hosts for j in w.jobs] == [["node1", "node2"]] * 2 and not [e for e, _ in w.emitted if e == "host_lost"]


def test_restarts_are_bounded():
    def flaky(w, job):  # every attempt dies with no stop event and every host answers probes
        w.answer(1)
        job.code = 1
    w = World(["node1", "node2"], {i: flaky for i in range(1, 10)})
    code, msg = w.driver(["node1", "node2"], 2, max_restarts=2).run()
    assert code == 3 and "2 restart" in msg and len(w.jobs) == 3


def test_rejoin_drains_and_relaunches_on_bigger_set():
    def draining(w, job):
        if job.drained_at is not None and w.t - job.drained_at >= 0.3:
            job.stop(5)
            job.code = 5
        elif len(w.answered) < IMAGES:
            w.answer(2)
    w = World(["node1", "node2"], {1: lose_daemon("node2", 1.0), 2: draining, 3: steady()})
    w.timers.append((4.0, lambda: w.up.__setitem__("node2", True)))  # power-on
    d = w.driver(["node1", "node2"], 2)
    code, _ = d.run()
    assert code == 0 and [j.hosts for j in w.jobs] == [["node1", "node2"], ["node1"], ["node1", "node2"]]
    assert w.jobs[1].drained_at == pytest.approx(4.0, abs=1.1)
    rejoin = [f for e, f in w.emitted if e == "rejoin"]
    assert rejoin and rejoin[0]["host"] == "node2" and 0 < rejoin[0]["ms"] < 1000
    assert summary(d, code, "")["rejoins"][0]["host"] == "node2"


def test_rejoin_that_does_not_drain_is_killed():
    def deaf(w, job):
        w.answer(1)
    w = World(["node1", "node2"], {1: lose_daemon("node2", 1.0), 2: deaf, 3: steady()})
    w.timers.append((2.0, lambda: w.up.__setitem__("node2", True)))
    code, _ = w.driver(["node1", "node2"], 2, drain_timeout=4.0).run()
    assert code == 0 and w.jobs[1].killed_at is not None and w.jobs[2].hosts == ["node1", "node2"]


def test_static_needs_every_device():
    w = World(["node1", "node2"], {1: lose_daemon("node2", 1.0)})
    w.jobs_family = "static"
    orig = FakeJob.__init__

    def static_init(self, *a):
        orig(self, *a)
        self.world.events[-1]["family"] = "static"
    FakeJob.__init__ = static_init
    try:
        code, msg = w.driver(["node1", "node2"], 2).run()
    finally:
        FakeJob.__init__ = orig
    assert code == 3 and "2 needed" in msg and len(w.jobs) == 1


@pytest.mark.parametrize("infer_code", [2, 3])
def test_infer_final_codes_are_passed_on(infer_code):
    def stops(w, job):
        job.stop(infer_code, message="why")
        job.code = infer_code
    w = World(["node1"], {1: stops})
    assert w.driver(["node1"], 1).run() == (infer_code, "why")


def test_interrupt_kills_and_cleans_every_host():
    flag = []
    w = World(["node1", "node2"], {1: lambda w, job: w.answer(1)})
    w.timers.append((1.0, lambda: flag.append(1)))
    code, _ = w.driver(["node1", "node2"], 2, interrupted=lambda: bool(flag)).run()
    assert code == 130 and w.jobs[0].killed_at == pytest.approx(1.1, abs=0.15)
    assert w.cleaned[-1] == ["node1", "node2"]


def test_in_job_failure_reported_from_infer_events():
    def proc_exit(w, job):
        if job.elapsed() == pytest.approx(0.5):
            w.events += [{"event": "failure", "rank": 1, "host": "node2", "fault": "process exit",
                          "detected_ms": 3.0, "t": 100.0},
                         {"event": "answering_again", "after_failure_ms": 40.0}]
        steady()(w, job) if not hasattr(job, "done_at") else None
        if hasattr(job, "done_at"):
            job.code = 0
    w = World(["node1", "node2"], {1: proc_exit})
    d = w.driver(["node1", "node2"], 2)
    code, _ = d.run()
    assert code == 0 and len(w.jobs) == 1
    rec = summary(d, code, "")["failures"]
    assert rec[0]["fault"] == "process exit" and rec[0]["next_answer_ms"] == 40.0 and rec[0]["seen_by"] == "infer"


# --- hosts.py ---------------------------------------------------------------------------------------

def test_parse_hostfile_text():
    text = "# pis\nnode1 slots=1\nnode2 slots=2 max_slots=4  # two\n\nnode1\n"
    assert hostlib.parse_hostfile_text(text) == [hostlib.HostSlot("node1", 2), hostlib.HostSlot("node2", 2)]


def test_agent_and_remote_argv():
    assert hostlib.agent_command({"PRTE_MCA_plm_ssh_agent": "/run/x/agent -v"}) == ["/run/x/agent", "-v"]
    ssh = hostlib.agent_command({})
    assert ssh[0] == "ssh" and "BatchMode=yes" in ssh and any(a.startswith("ConnectTimeout") for a in ssh)
    assert hostlib.remote_argv(["a"], "h", ["echo", "x y"]) == ["a", "h", "echo 'x y'"]


def test_probe_and_kill_marked_with_fake_runner():
    calls = []

    def run(argv, timeout):
        calls.append(argv)
        return (0, "") if argv[1] == "up" else (None, "no answer")
    assert hostlib.probe_many(["agent"], ["up", "down"], run=run) == {"up": True, "down": False}
    calls.clear()
    hostlib.kill_marked(["agent"], ["up"], "fluid_run=abc", run=run)
    assert calls == [["agent", "up", "pkill -KILL -f '[f]luid_run=abc'"]]


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

def test_file_outputs_tail_and_indices(tmp_path):
    ev, pr = tmp_path / "e.jsonl", tmp_path / "p.jsonl"
    ev.write_text('{"event": "old"}\n')
    out = FileOutputs(ev, pr)
    with open(ev, "a") as fh:
        fh.write('{"event": "start"}\n{"event": "host_lost", "by": "launch"}\n{"event": "to')
    assert [e["event"] for e in out.new_events()] == ["start"]
    with open(ev, "a") as fh:
        fh.write('rn"}\n')
    assert [e["event"] for e in out.new_events()] == ["torn"]
    pr.write_text('{"index": 1}\n{"index": 2}\n{"index": 1}\n{"index": 3')
    assert read_indices(pr) == ({1, 2}, 1) and out.answered() == 2 and out.progress() > 0


def test_mpirun_command_has_marker_and_flags(tmp_path):
    lau = MpirunLauncher("/v/mpirun", ["--checkpoint", "/c.pt"], tmp_path, "abc123", ["agent"], {})
    cmd = lau.command(["node1", "node3"], 2)
    assert cmd[:5] == ["/v/mpirun", "--hostfile", str(tmp_path / "hosts-2"), "-np", "2"]
    assert "--with-ft" in cmd and "tcp,self" in cmd and "^han" in cmd and "node" in cmd
    assert cmd[cmd.index("-X") + 1] == "fluid_run=abc123" and cmd[-3:] == ["--resume", "--summary",
                                                                            str(tmp_path / "infer-2.json")]
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

    cmd = [sys.executable, "-m", "fluid_mpi.cli", "launch", "-np", "2", "--hostfile", str(tmp_path / "hosts"),
           "-c", str(tmp_path / "m.pt"), "--run-dir", str(tmp_path / "run"), *extra]
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
