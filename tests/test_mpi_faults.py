"""Fault tests: real mpirun, real signals, hard timeouts. A victim dies after a fixed number of its own
batches (--kill-rank R:HOW:AFTER), so every run is reproducible. Outcomes are read from the summary, the
predictions and the --events log, never from stderr prose; every run's exit code is asserted. Time bounds
come from the configuration (--rank-timeout and the liveness policy's constants), measured inside the run
from the victim's death stamp, never the wall time of a whole mpirun (start-up depends on the machine)."""
import math
import socket

import pytest

from conftest import run_mpi
from helpers import check_against, reference_logits

from fluid_mpi.runtime.liveness import KILL_GRACE_S, coordinator_silence_limit, recovery_deadline
from fluid_mpi.runtime.options import InferOptions

pytestmark = pytest.mark.mpi
LIMIT, BATCH = 160, 16  # 10 batches
HOWS = ["kill", "term", "segv", "raise", "exit", "hang"]
TIMEOUT = 1.5  # --rank-timeout of these runs: a batch of 16 takes milliseconds
FAILURE_KEYS = {"rank", "host", "fault", "how", "after_batch", "detected_ms", "detected_from", "at_s"}


def detection_bound_ms(how: str, rank_timeout: float) -> float:
    """The latest a victim's failure may be detected, from its death stamp. A dead process is reported by
    ULFM (tens of ms), well before the deadline that would otherwise catch it (a worker holding a batch
    past --rank-timeout); a frozen one is caught by that deadline, counted from the last batch it was sent
    (at most the rank timeout before its death) plus one more rank timeout of slack."""
    return 1000 * (2 * rank_timeout if how == "hang" else rank_timeout)


def check_failure(f: dict, how: str, rank_timeout: float = TIMEOUT) -> None:
    """One ``failure`` record: its fields, their types, and a detection time within the bound."""
    assert FAILURE_KEYS <= set(f), f
    assert isinstance(f["rank"], int) and f["host"] == socket.gethostname(), f  # every rank on this host
    assert f["how"] == how and f["fault"] == ("silent" if how == "hang" else "process exit"), f
    assert f["detected_from"] == "death stamp", f  # measured from the victim's own stamp
    ms = f["detected_ms"]
    assert isinstance(ms, (int, float)) and math.isfinite(ms), f
    assert 0 <= ms < detection_bound_ms(how, rank_timeout), f
    assert isinstance(f["after_batch"], int) and f["after_batch"] >= 1 and f["at_s"] >= 0, f


def check_recovery(res, rank_timeout: float = TIMEOUT) -> None:
    """After the first failure the run answers again, within the recovery's own deadline (detection, a kill
    of a frozen rank, the shrink), counted from the death: not a wall time of the whole run."""
    log = [e["event"] for e in res.events]
    first = events_of(res, "failure")[0]
    again = events_of(res, "answering_again")
    assert again, "the time from the fault to the next answer is logged"
    assert log.index("failure") < log.index("answering_again"), log
    ms = again[0]["after_failure_ms"]
    assert first["detected_ms"] - 0.2 <= ms <= 1000 * (rank_timeout + KILL_GRACE_S + recovery_deadline(rank_timeout)), \
        (first, again[0])


def fluid_refs(ckpt):
    refs = {"subset": {}, "rank": {}}

    def for_pred(p, mode):
        if mode == "ha":
            subset = tuple(int(g) for g in p["groups"].split("+"))
            if subset not in refs["subset"]:
                refs["subset"][subset] = reference_logits(ckpt, LIMIT, subset)
            return refs["subset"][subset][p["index"]]
        if p["rank"] not in refs["rank"]:
            refs["rank"][p["rank"]] = reference_logits(ckpt, LIMIT, (p["rank"],))
        return refs["rank"][p["rank"]][p["index"]]

    return for_pred


def events_of(res, kind):
    return [e for e in res.events if e["event"] == kind]


def assert_exactly_once(res, n=LIMIT):
    assert res.torn == 0
    assert sorted(p["index"] for p in res.predictions) == list(range(n))


def assert_survived(res, victims, k, how, rank_timeout=TIMEOUT):
    assert res.returncode == 0, res.stderr[-2000:]
    s = res.summary
    assert s["status"] == "ok" and s["answered"] == LIMIT and s["duplicates"] == 0 and s["exit_code"] == 0
    assert_exactly_once(res)
    assert len(res.predictions) == LIMIT  # no answer twice in the file either
    failures = events_of(res, "failure")
    assert sorted(f["rank"] for f in failures) == sorted(victims) and s["failures"] == failures
    for f in failures:
        check_failure(f, how, rank_timeout)
    assert s["ranks_start"] == k and s["ranks_end"] == k - len(victims)
    assert events_of(res, "stop")[-1]["exit_code"] == 0
    check_recovery(res, rank_timeout)


# Every way of dying in both modes, the cluster shapes (K, victim) taken in turn: each how meets two shapes,
# each shape every mode and two hows in each (a covering set; all 36 combinations cost 24 more mpiruns, and
# the recovery path does not depend on how and shape together).
SHAPES = [(2, 1), (3, 1), (3, 2)]
WORKER_DEATHS = [(*SHAPES[(i + j) % 3], mode, how) for i, how in enumerate(HOWS) for j, mode in enumerate(["ha", "ht"])]


@pytest.mark.parametrize("k,victim,mode,how", WORKER_DEATHS)
def test_fluid_survives_a_worker_death(ckpts, tmp_path, k, victim, mode, how):
    ckpt = ckpts("fluid", k)
    after = 3 if mode == "ha" else 1
    res = run_mpi(k, ["-c", str(ckpt), "--mode", mode, "--limit", str(LIMIT), "-b", str(BATCH),
                      "--kill-rank", f"{victim}:{how}:{after}", "--rank-timeout", str(TIMEOUT)], tmp_path, timeout=60)
    assert_survived(res, [victim], k, how)
    failure = events_of(res, "failure")[0]
    assert failure["after_batch"] == after and failure["fault"] == ("silent" if how == "hang" else "process exit")
    if how == "hang":  # frozen: killed out of band by the liveness policy, then recovered in-job
        assert [e["rank"] for e in events_of(res, "kill")] == [victim]
    ref = fluid_refs(ckpt)  # one cache of reference logits per run
    check_against(res.predictions, lambda p: ref(p, mode))
    if mode == "ha":  # the head switched from all groups to the survivors' subset
        survivors = "+".join(str(r) for r in range(k) if r != victim)
        assert {p["groups"] for p in res.predictions} == {"+".join(map(str, range(k))), survivors}
        assert events_of(res, "head_switch")[0]["head"] == survivors
    else:
        assert any(p["rank"] == victim for p in res.predictions)  # its answers before death are kept


@pytest.mark.parametrize("mode", ["ha", "ht"])
def test_fluid_survives_two_failures(ckpts, tmp_path, mode):
    """Ranks 1 and 2 die after their first batch: each is handed 2 at once, so it dies holding one, and the
    coordinator must notice. (After 2, CI saw the coordinator compute every other batch while the workers
    were still starting: both died after the run had every answer, and no failure was reported.)"""
    ckpt = ckpts("fluid", 3)
    res = run_mpi(3, ["-c", str(ckpt), "--mode", mode, "--limit", str(LIMIT), "-b", str(BATCH),
                      "--kill-rank", "1", "--kill-rank", "2", "--kill-after", "1"], tmp_path, timeout=60)
    assert_survived(res, [1, 2], 3, "kill", InferOptions.rank_timeout)  # the default --rank-timeout
    ref = fluid_refs(ckpt)
    check_against(res.predictions, lambda p: ref(p, mode))


@pytest.mark.parametrize("mode", ["ha", "ht"])
def test_frozen_rank_while_another_dies_ends_in_bounded_time(ckpts, tmp_path, mode):
    """K = 3: rank 1 freezes, then rank 2 dies. The shrink would wait for the frozen rank forever; the
    recovery path kills it first, so the run goes on on rank 0 alone with exactly-once answers.
    Rank 1 freezes after its first batch, rank 2 dies after its second: each worker is handed 4 batches at
    once (its credit at batch 16), so both are sure to come, and in that order, while rank 1 still holds a batch (the
    run cannot end before). With "2:kill:3", rank 2's third batch was at times the run's last: it died
    after the run had everything (no failure reported, or mpirun never exited)."""
    ckpt = ckpts("fluid", 3)
    res = run_mpi(3, ["-c", str(ckpt), "--mode", mode, "--limit", str(LIMIT), "-b", str(BATCH),
                      "--kill-rank", "1:hang:1", "--kill-rank", "2:kill:2", "--rank-timeout", str(TIMEOUT)],
                  tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.summary["status"] == "ok" and res.summary["ranks_end"] == 1
    assert_exactly_once(res)
    failures = {f["rank"]: f for f in events_of(res, "failure")}
    assert sorted(failures) == [1, 2] and len(events_of(res, "failure")) == 2
    check_failure(failures[1], "hang")
    check_failure(failures[2], "kill")
    assert [e["rank"] for e in events_of(res, "kill")] == [1]  # the frozen rank, killed out of band
    # bounded: from rank 1's freeze to the stop, at most the time the policy allows a silent coordinator
    frozen_at = failures[1]["t"] - failures[1]["detected_ms"] / 1000
    assert events_of(res, "stop")[-1]["t"] - frozen_at < coordinator_silence_limit(TIMEOUT)


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_static_stops_cleanly(ckpts, tmp_path, how):
    ckpt = ckpts("static", 2)
    res = run_mpi(2, ["-c", str(ckpt), "--limit", str(LIMIT), "-b", str(BATCH), "--kill-rank", f"1:{how}:4",
                      "--rank-timeout", str(TIMEOUT)], tmp_path, timeout=60)
    assert res.returncode == 3, res.stderr[-2000:]
    s = res.summary
    assert s["status"] == "failed" and s["exit_code"] == 3 and "slice 1" in s["message"]
    assert [f["rank"] for f in s["failures"]] == [1]
    assert s["answered"] == 4 * BATCH == len(res.predictions)  # every answer before the failure kept
    assert events_of(res, "stop")[-1]["status"] == "failed" and "Traceback" not in res.stderr
    ref = reference_logits(ckpt, LIMIT)
    check_against(res.predictions, lambda p: ref[p["index"]])


@pytest.mark.parametrize("victim,width_after", [(1, 1), (2, 2)])
def test_dynamic_narrows_when_a_later_slice_dies(ckpts, tmp_path, victim, width_after):
    ckpt = ckpts("dynamic", 3)
    res = run_mpi(3, ["-c", str(ckpt), "--limit", str(LIMIT), "-b", str(BATCH), "--kill-rank", f"{victim}:kill:4"],
                  tmp_path, timeout=60)
    assert_survived(res, [victim], 3, "kill")
    assert res.summary["width_end"] == width_after
    assert events_of(res, "width_switch")[0]["width"] == width_after
    assert {p["width"] for p in res.predictions} == {3, width_after}
    refs = {w: reference_logits(ckpt, LIMIT, width=w) for w in (3, width_after)}
    check_against(res.predictions, lambda p: refs[p["width"]][p["index"]])


@pytest.mark.parametrize("family,how", [("dynamic", "kill"), ("static", "hang"), ("dynamic", "hang")])
def test_sliced_stops_when_rank_0_is_lost(ckpts, tmp_path, family, how):
    """Losing slice 0 stops Static and Dynamic. A dead or frozen rank 0 (a frozen one is killed by the
    survivor on its host) cannot write the summary: the lowest survivor does (status failed, exit 3),
    within --rank-timeout plus a few seconds, with rank 0's answers kept."""
    ckpt = ckpts(family, 2)
    res = run_mpi(2, ["-c", str(ckpt), "--limit", str(LIMIT), "-b", str(BATCH), "--kill-rank", f"0:{how}:4",
                      "--rank-timeout", str(TIMEOUT)], tmp_path, timeout=60)
    assert res.returncode == 3, res.stderr[-2000:]
    s = res.summary
    assert s is not None and s["status"] == "failed" and s["exit_code"] == 3
    assert [f["rank"] for f in s["failures"]] == [0] and s["answered"] == 4 * BATCH
    assert sorted(p["index"] for p in res.predictions) == list(range(4 * BATCH)) and res.torn == 0
    # within the time the survivor allows a coordinator it cannot observe, from rank 0's death stamp
    (f,) = events_of(res, "failure")
    assert f["rank"] == 0 and f["how"] == how and f["detected_from"] == "death stamp", f
    died = f["t"] - f["detected_ms"] / 1000
    assert 0 <= f["detected_ms"] and events_of(res, "stop")[-1]["t"] - died < coordinator_silence_limit(TIMEOUT), f


@pytest.mark.parametrize("how", ["kill", "hang"])
@pytest.mark.parametrize("mode", ["ha", "ht"])
@pytest.mark.parametrize("k", [2, 3])
def test_coordinator_loss_lowest_survivor_takes_over(ckpts, tmp_path, k, mode, how):
    """Rank 0 dies (or freezes: the survivor on its host kills it) after its first batch of its own: rank 1
    takes over, skips what the predictions file holds and finishes; every input exactly once. Rank 0
    computes at least 1 of the 10 batches: its first step hands every worker its credit (4 batches of 16),
    at most 8 of them, then computes one of its own. (After 2, with K = 3, the refills could take the
    last batches first.)"""
    ckpt = ckpts("fluid", k)
    res = run_mpi(k, ["-c", str(ckpt), "--mode", mode, "--limit", str(LIMIT), "-b", str(BATCH),
                      "--kill-rank", f"0:{how}:1", "--rank-timeout", str(TIMEOUT)], tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    s = res.summary
    assert s["takeover"]["coordinator"] == 1 and s["takeover"]["lost"] == [0] and s["status"] == "ok"
    assert s["takeover"]["answered_before"] >= BATCH and s["answered"] == LIMIT
    assert events_of(res, "takeover")[0]["coordinator"] == 1
    assert_exactly_once(res)  # rank 0's lines and the new coordinator's together
    assert len(res.predictions) == LIMIT and s["duplicates"] == 0
    ref = fluid_refs(ckpt)  # one cache of reference logits per run
    check_against(res.predictions, lambda p: ref(p, mode))
    (f,) = events_of(res, "failure")  # the new coordinator's record of rank 0
    assert f["rank"] == 0 and f["how"] == how and f["detected_from"] == "death stamp", f
    assert 0 <= f["detected_ms"] < 1000 * coordinator_silence_limit(TIMEOUT), f
