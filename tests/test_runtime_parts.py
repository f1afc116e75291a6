"""The runtime's plain-Python parts: the liveness policy, fault plans and the fault injector, the event log,
the predictions file (torn-line repair, duplicates, fsync rhythm). No MPI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np

from fluid_mpi.runtime.inputs import Batch
import pytest

from fluid_mpi.errors import LaunchError
from fluid_mpi.runtime import events as events_mod
from fluid_mpi.runtime import faults, outputs, remote
from fluid_mpi.runtime.events import EventLog, FailureTracker
from fluid_mpi.runtime.faults import Fault, FaultInjector, FaultPlan, read_death
from fluid_mpi.runtime.liveness import KILL_GRACE_S, Liveness, coordinator_silence_limit, process_state
from fluid_mpi.runtime.outputs import FSYNC_INTERVAL_S, PredictionSink, read_answered

from fake_transport import FakeClock


# --- liveness -------------------------------------------------------------------------------------
@pytest.fixture
def child():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
    proc.wait()


def settle(pid: int, letters: str) -> str:
    """Wait (up to 5 s) until process ``pid``'s state letter is one of ``letters``."""
    end = time.monotonic() + 5
    while process_state(pid) not in letters and time.monotonic() < end:
        time.sleep(0.005)
    return process_state(pid)


def test_state_of_a_real_process_alive_stopped_gone(child):
    lv = Liveness([("here", child.pid)], here="here")
    assert lv.state(0) == "alive" and not lv.lost(0)
    os.kill(child.pid, signal.SIGSTOP)
    assert settle(child.pid, "tT") in ("T", "t")
    assert lv.state(0) == "stopped" and lv.lost(0)
    os.kill(child.pid, signal.SIGCONT)
    settle(child.pid, "RSD")
    assert lv.state(0) == "alive"
    child.kill()
    settle(child.pid, "ZX")  # a zombie until reaped: gone already
    assert lv.state(0) == "gone" and lv.lost(0)
    child.wait()
    assert process_state(child.pid) == "" and lv.state(0) == "gone"


def test_state_on_another_host_is_not_observable():
    lv = Liveness([("far", os.getpid()), ("here", 0)], here="here")
    assert lv.state(0) == "remote" and not lv.lost(0)
    assert lv.state(1) == "remote"  # no pid: nothing to observe


def test_kill_stopped_kills_a_frozen_process_once(child):
    lv = Liveness([("here", os.getpid()), ("here", child.pid)], here="here")
    assert lv.kill_stopped([1]) == []  # running: left alone
    os.kill(child.pid, signal.SIGSTOP)
    settle(child.pid, "tT")
    assert lv.kill_stopped([1]) == [1]
    assert child.wait(5) == -signal.SIGKILL
    assert lv.kill_stopped([1]) == [] and 1 in lv.killed


def test_local_kill_is_sent_once():
    sent = []
    clock = FakeClock(50.0)
    lv = Liveness([("here", 0), ("here", 4242)], here="here", local_kill=sent.append, clock=clock)
    assert lv.kill(1) is True
    clock.advance(1)
    assert lv.kill(1) is True and sent == [4242] and lv.killed == {1: 50.0}
    assert lv.kill(0) is False and 0 in lv.unkillable  # no pid: cannot be killed


@pytest.mark.parametrize("ok", [True, False])
def test_remote_kill_goes_through_the_runner(ok):
    calls = []

    def runner(host, argv):
        calls.append((host, argv))
        return ok

    lv = Liveness([("here", 1), ("far", 777)], here="here", remote=runner,
                  local_kill=lambda pid: pytest.fail("not a local rank"))
    assert lv.kill(1) is ok and lv.kill(1) is ok
    assert calls == [("far", ["kill", "-9", "777"])]  # once, whatever the result
    assert (1 in lv.killed) is ok and (1 in lv.unkillable) is not ok
    assert lv.silent([0, 1]) == ([] if ok else [1])  # unkillable: silent at once


def test_silent_after_kill_grace_with_a_fake_clock():
    clock = FakeClock(10.0)
    lv = Liveness([("here", 1), ("far", 2)], here="here", remote=lambda h, a: True, clock=clock)
    lv.kill(1)
    clock.advance(KILL_GRACE_S)
    assert lv.silent([0, 1]) == []  # not past the grace yet
    clock.advance(0.01)
    assert lv.silent([0, 1]) == [1]
    assert lv.silent([0]) == []  # ULFM reported it: no longer a member, not silent


def test_coordinator_silence_limit_covers_noticing_killing_and_shrinking():
    from fluid_mpi.runtime.liveness import SHRINK_SLACK_S, recovery_deadline

    assert recovery_deadline(2.0) == 2.0 + SHRINK_SLACK_S
    assert coordinator_silence_limit(2.0) == 2 * 2.0 + KILL_GRACE_S + recovery_deadline(2.0)


def test_remote_command_uses_the_launch_agent(monkeypatch):
    monkeypatch.delenv("PRTE_MCA_plm_ssh_agent", raising=False)
    argv = remote.remote_command("node2", ["kill", "-9", "12"])
    assert argv[0] == "ssh" and "BatchMode=yes" in argv and argv[-2:] == ["node2", "kill -9 12"]
    monkeypatch.setenv("PRTE_MCA_plm_ssh_agent", "vcluster-exec --quiet")
    assert remote.remote_command("node2", ["true"]) == ["vcluster-exec", "--quiet", "node2", "true"]


# --- fault plans and the injector -------------------------------------------------------------------
def test_fault_plan_parse_old_and_new_forms():
    assert FaultPlan.parse(["1"]).faults == {1: Fault("kill", None)}
    assert FaultPlan.parse(["1"], "term", 4).faults == {1: Fault("term", 4)}  # --kill-how/--kill-after
    assert FaultPlan.parse(["2:hang"], "kill", 7).faults == {2: Fault("hang", 7)}
    assert FaultPlan.parse(["0:kill:3"], "segv", 9).faults == {0: Fault("kill", 3)}
    assert FaultPlan.parse(["1::4"], "exit").faults == {1: Fault("exit", 4)}
    plan = FaultPlan.parse(["1", "2:hang", "0:kill:3"], "raise", 5)
    assert plan.faults == {1: Fault("raise", 5), 2: Fault("hang", 5), 0: Fault("kill", 3)}
    assert plan.ranks == (0, 1, 2) and FaultPlan.parse([]).ranks == ()


@pytest.mark.parametrize("spec", ["x", "", "-1", "1:boom", "1:kill:x", "1:kill:-2", "1:kill:3:4", "1.5"])
def test_fault_plan_parse_rejects_bad_specs(spec):
    with pytest.raises(LaunchError, match="--kill-rank"):
        FaultPlan.parse([spec])


def test_fault_plan_parse_rejects_a_bad_default_how():
    with pytest.raises(LaunchError):
        FaultPlan.parse(["1"], "explode")


def test_fault_injector_counts_its_own_batches(monkeypatch, tmp_path):
    died = []
    monkeypatch.setattr(faults, "die", died.append)
    plan = FaultPlan.parse(["1:term:3", "2"], "hang")
    one, two, zero = (FaultInjector(plan, w, str(tmp_path)) for w in (1, 2, 0))
    for _ in range(2):
        one.tick(100)
        zero.tick(100)
    assert died == [] and one.computed == 2
    one.tick(100)
    assert died == ["term"]
    note = read_death(str(tmp_path), 1)
    assert note["after_batch"] == 3 and note["how"] == "term" and note["rank"] == 1
    assert read_death(str(tmp_path), 1) is None  # removed once read
    for _ in range(4):
        two.tick(10)  # no AFTER: halfway through its expected share (10 // 2 = 5)
    assert died == ["term"]
    two.tick(10)
    assert died == ["term", "hang"] and two.computed == 5
    for _ in range(50):
        zero.tick(10)  # no fault planned for rank 0
    assert died == ["term", "hang"]


# --- event log --------------------------------------------------------------------------------------
def test_event_log_appends_one_json_object_per_line(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(events_mod.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    path = tmp_path / "sub" / "events.jsonl"
    first = EventLog(path, clock=lambda: 12.5)
    rec = first.emit("start", ranks=3, hosts=[["a", 1]])
    assert rec == {"t": 12.5, "event": "start", "ranks": 3, "hosts": [["a", 1]]}
    first.close()
    second = EventLog(path, clock=lambda: 13.25)  # a relaunch: same file, appended
    second.emit("kill", rank=2, host="b", pid=9, reason="r")
    second.emit("stop", status="ok", exit_code=0)
    assert [r["event"] for r in second.of("kill", "stop")] == ["kill", "stop"] and second.of("start") == []
    second.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["start", "kill", "stop"]
    assert json.loads(lines[1]) == {"t": 13.25, "event": "kill", "rank": 2, "host": "b", "pid": 9, "reason": "r"}
    assert len(synced) == 3  # every line made durable
    EventLog(None).emit("start")  # in memory only


def test_failure_tracker_records_failure_then_answering_again(tmp_path):
    ev = EventLog(None)
    tr = FailureTracker(ev, {2: ("node2", 77)}, str(tmp_path), run_t0=100.0)
    tr.answered()
    assert ev.records == []
    tr.lost([2], 101.5, {2: 101.0}, 7, killed={})
    [f] = ev.of("failure")
    assert f["rank"] == 2 and f["host"] == "node2" and f["fault"] == "process exit" and f["how"] == "unknown"
    assert f["after_batch"] == 7 and f["detected_ms"] == 500.0 and f["at_s"] == 1.5
    assert f["detected_from"] == "last contact"
    tr.answered()
    tr.answered()
    assert len(ev.of("answering_again")) == 1
    tr.lost([2], 102.0, {}, None, killed={2: 101.9})
    assert ev.of("failure")[-1]["fault"] == "silent" and ev.of("failure")[-1]["detected_ms"] is None


# --- predictions ------------------------------------------------------------------------------------
def lines_of(*indices) -> bytes:
    return b"".join(json.dumps({"index": i, "label": 1, "pred": 1, "rank": 0}).encode() + b"\n" for i in indices)


def test_read_answered_counts_and_repairs_a_torn_last_line(tmp_path):
    path = tmp_path / "p.jsonl"
    good = lines_of(0, 1, 2)
    path.write_bytes(good + b'{"index": 3, "lab')
    got = read_answered(path)
    assert got.indices == {0, 1, 2} and got.torn == 1
    assert path.read_bytes().endswith(b'"lab')  # without repair nothing is changed
    got = read_answered(path, repair=True)
    assert got.indices == {0, 1, 2} and got.torn == 1 and path.read_bytes() == good
    again = read_answered(path, repair=True)
    assert again.indices == {0, 1, 2} and again.torn == 0
    assert read_answered(tmp_path / "missing.jsonl").indices == set() and read_answered(None).torn == 0


def test_read_answered_counts_a_corrupt_middle_line_and_keeps_the_rest(tmp_path):
    path = tmp_path / "p.jsonl"
    data = lines_of(0) + b"\x00\x00garbage\n" + b'{"no_index": 1}\n' + lines_of(1, 2)
    path.write_bytes(data)
    got = read_answered(path, repair=True)
    assert got.indices == {0, 1, 2} and got.torn == 2
    assert path.read_bytes() == data  # only a torn last line can be cut


def test_read_answered_never_reports_an_index_that_repair_removed(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(lines_of(0, 1) + lines_of(2)[:-1])  # died between the record and its newline
    got = read_answered(path, repair=True)
    kept = {json.loads(line)["index"] for line in path.read_text().splitlines()}
    assert got.indices <= kept


def batch(keys, labels, names=None):
    keys = np.array(keys)
    return Batch(0, keys, np.zeros((len(keys), 28, 28), np.uint8), np.array(labels), np.zeros(len(keys)), names)


def test_prediction_sink_counts_duplicates_and_writes_each_input_once(tmp_path):
    path = tmp_path / "out" / "p.jsonl"
    sink = PredictionSink(path, with_logits=True)
    logits = np.eye(10, dtype=np.float32)[[3, 1, 2]]
    sink.write(batch([10, 11, 12], [3, 0, 2]), logits, rank=1, extra={"width": 2})
    written = path.read_text().splitlines()  # flushed at once: a dead process loses nothing
    assert len(written) == 3
    sink.write(batch([12, 13], [2, 5]), logits[:2], rank=2)
    sink.close()
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["index"] for r in recs] == [10, 11, 12, 13] and sink.duplicates == 1
    assert sink.answered == {10, 11, 12, 13} and sink.correct == 2  # 10 and 12 right, 11 and 13 wrong
    latency = recs[0].pop("latency_ms")
    assert recs[0] == {"index": 10, "label": 3, "pred": 3, "confidence": round(np.e / (np.e + 9), 4), "rank": 1,
                       "width": 2, "logits": [0, 0, 0, 1, 0, 0, 0, 0, 0, 0]}
    assert latency >= 0 and len(sink.latency) == 4
    assert recs[3]["rank"] == 2 and "width" not in recs[3]
    again = PredictionSink(path, append=True)
    again.write(batch([14], [-1], ["x.png"]), logits[:1], rank=0)
    again.write_errors([(15, "bad.png", "cannot identify image file")])
    again.close()
    assert read_answered(path).indices == {10, 11, 12, 13, 14, 15}
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert recs[4]["name"] == "x.png" and "label" not in recs[4] and again.labelled == 0
    assert recs[5] == {"index": 15, "name": "bad.png", "error": "cannot identify image file"} and again.errors == 1


def test_prediction_sink_lines_are_the_same_whichever_way_they_are_formatted(tmp_path, monkeypatch):
    """A labelled batch of new inputs takes the one-format-per-line path; a batch with a duplicate the
    line-by-line one: the lines of the same inputs are byte for byte the same."""
    monkeypatch.setattr(outputs.time, "monotonic", lambda: 5.0)
    logits = np.random.default_rng(0).normal(size=(4, 10)).astype(np.float32)
    fast, slow = PredictionSink(tmp_path / "fast.jsonl"), PredictionSink(tmp_path / "slow.jsonl")
    fast.write(batch([7, 8, 9], [1, 2, 3]), logits[1:], rank=1, extra={"mode": "ha", "groups": "0+1"})
    slow.write(batch([6], [0]), logits[:1], rank=1, extra={"mode": "ha", "groups": "0+1"})
    slow.write(batch([6, 7, 8, 9], [0, 1, 2, 3]), logits, rank=1, extra={"mode": "ha", "groups": "0+1"})
    fast.close()
    slow.close()
    lines = (tmp_path / "fast.jsonl").read_text().splitlines()
    assert lines == (tmp_path / "slow.jsonl").read_text().splitlines()[1:]
    assert json.loads(lines[0])["index"] == 7 and slow.duplicates == 1
    assert fast.labelled == 3 and slow.labelled == 4
    assert slow.correct == fast.correct + (int(logits[0].argmax()) == 0)  # input 6's label is 0


def test_prediction_sink_fsyncs_at_most_every_interval(tmp_path, monkeypatch):
    synced = []
    clock = FakeClock()
    monkeypatch.setattr(outputs.os, "fsync", lambda fd: synced.append(fd))
    monkeypatch.setattr(outputs.time, "monotonic", clock)
    sink = PredictionSink(tmp_path / "p.jsonl")
    logits = np.zeros((1, 10), np.float32)

    def write(i):
        sink.write(batch([i], [0]), logits, rank=0)
        assert sink.settled(5.0)  # the helper thread has made the fsync asked for, if any

    write(0)
    assert len(synced) == 1  # the first batch is made durable
    for i in range(1, 20):
        clock.advance(FSYNC_INTERVAL_S / 10)
        write(i)
    assert len(synced) == 2  # 19 batches over 1.9 intervals: one more fsync, not one per batch
    clock.advance(FSYNC_INTERVAL_S)
    write(0)  # only a duplicate: nothing written, nothing to sync
    assert len(synced) == 2
    write(20)
    assert len(synced) == 3
    sink.close()
    assert len(synced) == 4 and not sink._syncer.thread.is_alive()  # close makes the rest durable
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 21


def test_fsync_thread_outlives_its_file_being_closed(tmp_path, monkeypatch):
    """A sink dropped without close(): the collector closes its file while an fsync may still be asked."""
    import threading

    from fluid_mpi.runtime.outputs import _Syncer

    errors = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    fh = open(tmp_path / "p.jsonl", "w")
    syncer = _Syncer(fh.fileno())
    fh.close()
    syncer.request()
    assert syncer.settled(5.0)  # 5 s: an fsync of an empty file takes milliseconds
    syncer.stop()
    assert errors == [] and not syncer.thread.is_alive()


def test_stopped_since_sees_only_a_stop_after_the_ranks_start(tmp_path):
    from fluid_mpi.runtime.events import EventLog, stopped_since

    path = tmp_path / "ev.jsonl"
    clock = iter([100.0, 101.0, 200.0, 201.0]).__next__
    log = EventLog(path, clock=clock)
    log.emit("start")
    log.emit("stop", status="ok")  # an earlier attempt's stop (t = 101)
    assert not stopped_since(path, 150.0) and stopped_since(path, 100.0)
    log.emit("start")
    log.emit("stop", status="silent")  # this attempt's stop (t = 201)
    assert stopped_since(path, 150.0)["status"] == "silent"  # a cut-off rank exits as this run did
    assert not stopped_since(None, 0.0) and not stopped_since(tmp_path / "missing", 0.0)


def test_sink_accuracy_per_answerer_on_both_paths(tmp_path):
    """HA's head, each HT group and a Dynamic width are counted apart, on the usual (fast) path and on
    the careful one (a named input, an unlabelled one) alike; unlabelled answers count for no one."""
    from fluid_mpi.runtime.outputs import accuracy_by_answerer

    sink = PredictionSink(tmp_path / "p.jsonl")
    hit = lambda labels: np.eye(10, dtype=np.float32)[labels]  # noqa: E731 - logits that predict `labels`
    sink.write(batch([0, 1, 2, 3], [1, 2, 3, 4]), hit([1, 2, 0, 4]), 0, {"mode": "ha", "groups": "0+1"})
    sink.write(batch([4, 5], [5, 6]), hit([5, 6]), 1, {"mode": "ht"})
    sink.write(batch([6, 7], [7, -1], names=["a.png", "b.png"]), hit([0, 3]), 1, {"mode": "ht"})
    sink.write(batch([8], [9]), hit([9]), 0, {"width": 2})
    sink.close()
    assert accuracy_by_answerer(sink.by_answerer) == {
        "0+1": {"answered": 4, "accuracy": 75.0}, "1": {"answered": 3, "accuracy": 66.667},
        "width 2": {"answered": 1, "accuracy": 100.0}}


def test_start_event_states_what_each_mode_costs():
    from fluid_mpi.runtime.roles import expected_accuracy

    meta = {"family": "fluid", "parts": 2, "test_data": "t", "accuracy": {
        "full": 98.1, "subsets": {"0": 96.5, "1": 95.5, "0+1": 98.1}}}
    assert expected_accuracy(meta) == {"expected_accuracy": {"ha": 98.1, "ht_mix": 96.0, "data": "t"}}
    assert expected_accuracy(dict(meta, accuracy={**meta["accuracy"], "ht_mix": 96.01}))["expected_accuracy"][
        "ht_mix"] == 96.01
    assert expected_accuracy({"family": "static", "parts": 2, "accuracy": {"full": 99.0}}) == {}
    assert expected_accuracy({"family": "fluid", "parts": 2}) == {}
