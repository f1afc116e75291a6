"""The elastic launcher's decisions with fakes (no MPI, no processes): a fake clock, fake mpirun jobs that
follow a script, a fake prober. Hosts, files and the whole command: tests/test_launch_cli.py."""
from __future__ import annotations

import pytest

from fluid_mpi.cluster.elastic import Clock, Driver, Settings


IMAGES = 1000


class World:
    """A fake cluster: time, which hosts answer probes, the answers written, the events file."""

    def __init__(self, hosts, scripts, family="fluid"):
        self.t, self.family = 0.0, family
        self.up = {h: True for h in hosts}
        self.scripts = scripts  # attempt -> callable(world, job) giving the job's behaviour per tick
        self.answered: set[int] = set()
        self.events: list[dict] = []
        self.emitted: list[tuple[str, dict]] = []
        self.jobs: list[FakeJob] = []
        self.cleaned: list[list[str]] = []
        self.timers: list[tuple[float, callable]] = []
        self.prepared: dict[str, float] = {}  # host -> when its warm process was started
        self.powered_off: set[str] = set()  # hosts whose warm process died
        self.warm_delay = 0.0  # a warm process's import time
        self.start_delay = 0.0  # how long an attempt's ranks take to start (infer's start event)
        self.frozen: set[str] = set()

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

    def prepare(self, hosts):  # a warm process starts on each host that has none (or lost it)
        for h in hosts:
            if self.prepared.get(h) is None or h in self.powered_off:
                self.prepared[h] = self.t
                self.powered_off.discard(h)

    def responsive(self, host):  # a frozen host's agent gets in (virtual cluster), its processes do not run
        return host not in self.frozen

    def ready(self, host):
        return self.prepared.get(host) is not None and self.t - self.prepared[host] >= self.warm_delay

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
        self.started = False
        if not world.start_delay:
            self._start()

    def _start(self):
        self.started = True
        self.world.events.append({"event": "start", "ranks": len(self.hosts), "family": self.world.family,
                                  "mode": "ht", "images": IMAGES, "todo": IMAGES - len(self.world.answered)})

    def elapsed(self):
        return self.world.t - self.t0

    def tick(self):
        if not self.started:
            if self.elapsed() < self.world.start_delay:
                return
            self._start()
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
    rec = d.summary(code, "")["failures"][0]
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
    (rec,) = d.summary(0, "")["failures"]  # infer's figures, one entry
    assert rec["seen_by"] == "infer+launcher" and rec["detected_ms"] == 2000.0
    assert 2000 < rec["next_answer_ms"] < 2500  # from the fault infer dated, to the relaunch's first answer


def test_frozen_host_whose_agent_gets_in_stays_out_until_it_thaws():
    """A silent host that answers probes but whose processes do not run (the virtual cluster's freeze)
    is left out like a frozen board; when it thaws it rejoins."""
    def silent(w, job):
        if job.elapsed() < 1.0:
            w.answer(10)
        elif job.code is None and not getattr(job, "stopped", False):
            job.stopped = True
            w.frozen.add("node2")
            w.events.append({"event": "failure", "host": "node2", "fault": "silent", "detected_ms": 2000.0})
            job.stop(4, silent_hosts=["node2"])
    w = World(["node1", "node2"], {1: silent, 2: _draining, 3: steady()})
    w.timers.append((5.0, lambda: w.frozen.discard("node2")))  # thaw
    code, _ = w.driver(["node1", "node2"], 2).run()
    assert code == 0
    assert [(f["fault"], f["excluded"]) for e, f in w.emitted if e == "host_lost"] == [("silent", True)]
    assert [j.hosts for j in w.jobs] == [["node1", "node2"], ["node1"], ["node1", "node2"]]
    assert w.jobs[1].drained_at == pytest.approx(5.0, abs=1.1)  # the first probe after the thaw


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


@pytest.mark.parametrize("start_delay, killed", [(20.0, False), (70.0, True)])
def test_a_slow_start_is_not_a_stall(start_delay, killed):
    """Before infer's start event (ranks importing torch, MPI_Init) the start timeout applies, not the
    stall timeout: 8 cold ranks on small boards take far longer to start than a stall allows."""
    w = World(["node1", "node2"], {1: steady(), 2: steady()})
    w.start_delay = start_delay
    code, _ = w.driver(["node1", "node2"], 2, stall_timeout=5.0, start_timeout=60.0, max_restarts=0).run()
    assert (w.jobs[0].killed_at is not None) == killed
    assert code == (3 if killed else 0)
    if killed:
        assert w.jobs[0].killed_at == pytest.approx(60.0, abs=0.3)


def test_restarts_are_bounded():
    def flaky(w, job):  # every attempt dies with no stop event and every host answers probes
        w.answer(1)
        job.code = 1
    w = World(["node1", "node2"], {i: flaky for i in range(1, 10)})
    code, msg = w.driver(["node1", "node2"], 2, max_restarts=2).run()
    assert code == 3 and "2 restart" in msg and len(w.jobs) == 3


def _draining(w, job):
    """Answers until drained; 0.3 s later writes stop 5 and exits."""
    if job.drained_at is not None and w.t - job.drained_at >= 0.3:
        job.stop(5)
        job.code = 5
    elif len(w.answered) < IMAGES:
        w.answer(1)


def test_rejoin_drains_and_relaunches_on_bigger_set():
    w = World(["node1", "node2"], {1: lose_daemon("node2", 1.0), 2: _draining, 3: steady()})
    w.timers.append((4.0, lambda: w.up.__setitem__("node2", True)))  # power-on
    d = w.driver(["node1", "node2"], 2)
    code, _ = d.run()
    assert code == 0 and [j.hosts for j in w.jobs] == [["node1", "node2"], ["node1"], ["node1", "node2"]]
    assert w.jobs[1].drained_at == pytest.approx(4.0, abs=1.1)
    assert ["node2"] in w.cleaned  # orphans on the returning host killed as soon as it answered
    rejoin = [f for e, f in w.emitted if e == "rejoin"]
    assert rejoin and rejoin[0]["host"] == "node2" and 0 < rejoin[0]["ms"] < 1000
    assert d.summary(code, "")["rejoins"][0]["host"] == "node2"


@pytest.mark.parametrize("warm_delay, ready_wait", [(2.5, 30.0), (99.0, 3.0)])
def test_rejoin_waits_for_the_returning_host_to_be_ready(warm_delay, ready_wait):
    """The others go on answering while the returning host's warm process imports torch; the drain
    comes when it is ready, or after ready_wait at the latest (its rank then starts cold)."""
    w = World(["node1", "node2"], {1: lose_daemon("node2", 1.0), 2: _draining, 3: steady()})
    w.warm_delay = warm_delay
    w.timers.append((1.0, lambda: w.powered_off.add("node2")))
    w.timers.append((4.0, lambda: w.up.__setitem__("node2", True)))  # power-on, probed by t = 5
    code, _ = w.driver(["node1", "node2"], 2, ready_wait=ready_wait).run()
    assert code == 0 and [j.hosts for j in w.jobs] == [["node1", "node2"], ["node1"], ["node1", "node2"]]
    returned = w.prepared["node2"]  # the new warm process started as soon as node2 answered
    assert 4.0 <= returned <= 5.1
    assert w.jobs[1].drained_at == pytest.approx(returned + min(warm_delay, ready_wait), abs=0.25)


def test_lost_hosts_are_probed_more_often_than_the_attempts():
    """A returning device is noticed within lost_probe_every of its power-on (part of its rejoin time);
    the attempt's own hosts are still probed once per probe_every."""
    w = World(["node1", "node2"], {1: lose_daemon("node2", 1.0), 2: _draining, 3: steady()})
    w.timers.append((4.03, lambda: w.up.__setitem__("node2", True)))  # power-on
    probed: list[tuple[float, tuple]] = []
    real = w.probe
    w.probe = lambda hosts: probed.append((w.t, tuple(hosts))) or real(hosts)
    d = w.driver(["node1", "node2"], 2, lost_probe_every=0.25)
    assert d.run()[0] == 0
    back = next(f for e, f in w.emitted if e == "host_back")
    assert back["hosts"] == ["node2"] and w.prepared["node2"] - 4.03 <= 0.25 + 0.1  # + one tick
    attempt2 = [t for t, hosts in probed if "node1" in hosts and w.jobs[1].t0 <= t < w.jobs[1].drained_at]
    lost_only = [t for t, hosts in probed if hosts == ("node2",)]
    assert len(attempt2) >= 2 and len(lost_only) >= 2 * len(attempt2)  # node2 alone in between
    while_lost = [t for t, hosts in probed if "node2" in hosts and lost_only[0] <= t <= w.prepared["node2"]]
    assert all(b - a <= 0.25 + 0.1 + 1e-9 for a, b in zip(while_lost, while_lost[1:]))  # + one tick
    assert all(b - a >= 0.99 for a, b in zip(attempt2, attempt2[1:]))


def test_rejoin_that_does_not_drain_is_killed():
    def deaf(w, job):
        w.answer(1)
    w = World(["node1", "node2"], {1: lose_daemon("node2", 1.0), 2: deaf, 3: steady()})
    w.timers.append((2.0, lambda: w.up.__setitem__("node2", True)))
    code, _ = w.driver(["node1", "node2"], 2, drain_timeout=4.0).run()
    assert code == 0 and w.jobs[1].killed_at is not None and w.jobs[2].hosts == ["node1", "node2"]


def test_static_needs_every_device():
    w = World(["node1", "node2"], {1: lose_daemon("node2", 1.0)}, family="static")
    code, msg = w.driver(["node1", "node2"], 2).run()
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
    rec = d.summary(code, "")["failures"]
    assert rec[0]["fault"] == "process exit" and rec[0]["next_answer_ms"] == 40.0 and rec[0]["seen_by"] == "infer"
