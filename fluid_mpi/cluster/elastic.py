"""The elastic driver's decisions (the Horovod Elastic / torchrun pattern): which hosts run the next
attempt, when an attempt is over, when to relaunch, when to give up and when a returning host rejoins.

Plain Python: processes and files come in through the ``Launcher``/``Outputs`` protocols, probes through
a callable, time from a clock; tests/test_elastic.py drives it with fakes, ``runner.py`` has the real ones.
Why a driver (shared/MPI_NOTES.md): when a host's Open MPI daemon is lost PRRTE ends the whole job within
a second, and a pulled cable hangs it for minutes; a process death on a live host is ULFM's, in-job.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

# exit codes of `fluid-mpi infer` (its `stop` event) and of `fluid-mpi launch`, under the driver's names
from ..errors import EXIT_BAD_INPUT as BAD_INPUT, EXIT_DRAINED as DRAINED, EXIT_FAILED as STOPPED
from ..errors import EXIT_INTERRUPTED as INTERRUPTED, EXIT_OK as OK, EXIT_SILENT as SILENT
from .elastic_parts import Clock, Job, Launcher, Outputs, Settings  # noqa: F401 (re-exported)


@dataclass
class Failure:
    """One lost device (seen from outside) or one in-job failure (from infer's events)."""

    host: str
    fault: str  # lost daemon | silent | process exit | damaged message
    detected_ms: float | None  # from the last answer before it (outside) or infer's own figure
    source: str = "launcher"  # launcher | infer
    wall_detected: float = field(default_factory=time.time)
    next_answer_ms: float | None = None  # the fault -> the first answer after it
    fault_at: float | None = None  # monotonic estimate of the fault: infer's figure, else the last answer

    def record(self) -> dict:
        """The summary entry."""
        return {"host": self.host, "fault": self.fault, "detected_ms": _ms(self.detected_ms),
                "next_answer_ms": _ms(self.next_answer_ms), "seen_by": self.source,
                "detected_at": round(self.wall_detected, 3)}


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


@dataclass
class AttemptEnd:
    """How one attempt ended: infer's code (from its `stop` event) or mpirun's, and why."""

    code: int | None  # None: killed by the driver without a stop event
    stop: dict | None  # infer's stop event, if any
    reason: str  # exited | stalled | drained | interrupted | killed after stop
    returned: list[str] = field(default_factory=list)  # lost hosts that answer again (rejoin)


class Driver:
    """Runs attempts until every input is answered or it gives up; see :meth:`run`."""

    def __init__(self, hosts: Sequence[str], settings: Settings, launcher: Launcher, outputs: Outputs,
                 probe: Callable[[Sequence[str]], dict[str, bool]], emit: Callable[..., None],
                 clock: Clock | None = None, interrupted: Callable[[], bool] = lambda: False):
        self.all_hosts, self.s = list(hosts), settings
        self.launcher, self.outputs, self.probe, self.emit = launcher, outputs, probe, emit
        self.clock, self.interrupted = clock or Clock(), interrupted
        self.lost: dict[str, Failure] = {}  # host -> why it is left out
        self.failures: list[Failure] = []  # every failure, for the summary
        self.rejoins, self.attempts, self.start_info = [], [], {}
        self.last_answer: float | None = None  # when the last answer was seen (monotonic)
        self._progress = 0  # the predictions file's size last seen
        self._waiting: list = []  # failures and rejoins waiting for the next answer
        self._attempt_failures = 0  # failures[this:] were reported during the current attempt
        self._returned_at: dict[str, float] = {}  # lost host -> when a probe first answered again

    def active_hosts(self) -> list[str]:
        """The hosts of the next attempt: hostfile order, lost ones left out, at most -np of them."""
        return [h for h in self.all_hosts if h not in self.lost][: self.s.np]

    def min_hosts(self) -> int:
        """Static needs every slice (the width it started with); Fluid and Dynamic go on with one."""
        return self.start_info.get("ranks", 1) if self.start_info.get("family") == "static" else 1

    def run(self) -> tuple[int, str]:
        """Attempts until done; returns (exit code, one-line message)."""
        restarts = attempt = 0
        while True:
            hosts = self.active_hosts()
            if len(hosts) < self.min_hosts() or not hosts:
                return STOPPED, f"{len(hosts)} host(s) left, {self.min_hosts()} needed"
            attempt += 1
            if attempt > 1:
                self.emit("relaunch", hosts=hosts, attempt=attempt, todo=self._todo())
            self._progress = self.outputs.progress()  # late writes of a killed attempt are not answers
            self.launcher.prepare(hosts)
            end = self.watch(self.launcher.start(hosts, attempt), hosts)
            self._answered_now()  # answers written just before the end belong to this attempt
            self.attempts.append({"attempt": attempt, "hosts": hosts, "code": end.code, "reason": end.reason})
            if end.reason == "interrupted":
                self.launcher.cleanup(self.all_hosts)
                return INTERRUPTED, "interrupted"
            if end.code == OK and self._complete():
                return OK, "every input answered"
            if end.code == BAD_INPUT:
                return BAD_INPUT, (end.stop or {}).get("message") or "infer rejected its input"
            if end.code == STOPPED:
                return STOPPED, (end.stop or {}).get("message") or "infer stopped after a failure"
            if end.returned:  # rejoin: a drained (or drain-timed-out) attempt is not a failure
                self.launcher.cleanup(list(hosts) + end.returned)  # orphans of old attempts too
                self._rejoin(end.returned)
                continue
            back = self._mark_lost(end, hosts)
            self.launcher.cleanup(list(hosts) + back)
            self._rejoin(back)
            restarts += 1
            if restarts > self.s.max_restarts:
                return STOPPED, f"gave up after {self.s.max_restarts} restart(s)"

    def watch(self, job: Job, hosts: Sequence[str]) -> AttemptEnd:
        """Follow one attempt until mpirun ends, is drained, or must be killed."""
        now = self.clock.now
        seen = now()  # last sign of life: an answer or an event
        stop: dict | None = None
        stop_at = drain_at = None
        next_probe = seen + self.s.probe_every
        back: list[str] = []  # lost hosts that answered again, for which the attempt is being drained
        misses: dict[str, int] = {}  # consecutive probes an attempt's host did not answer
        self._attempt_failures = len(self.failures)
        running = False  # infer has started (its SIGUSR2 handler is in place): a drain is safe
        answering: list[str] = []  # lost hosts that answered the last probe
        while True:
            if self.interrupted():
                job.kill()
                return AttemptEnd(None, stop, "interrupted")
            for ev in self.outputs.new_events():
                seen = now()
                running = running or ev.get("event") == "start"
                stop, stop_at = (ev, now()) if ev.get("event") == "stop" else (stop, stop_at)
                self._infer_event(ev)
            seen = now() if self._answered_now() else seen
            if (code := job.poll()) is not None:
                reason = "drained" if drain_at is not None else "exited"
                return AttemptEnd(_code(stop, code), stop, reason, back)
            # a silent host's daemon cannot take part in PRRTE's teardown: no grace after exit code 4
            grace = 0.0 if (stop or {}).get("exit_code") == SILENT else self.s.stop_grace
            why = ("killed after stop" if stop_at is not None and now() - stop_at > grace else
                   "drained" if drain_at is not None and now() - drain_at > self.s.drain_timeout else
                   "stalled" if stop is None and drain_at is None and now() - seen > self.s.stall_timeout
                   else None)
            if why:
                job.kill()
                return AttemptEnd(_code(stop, None), stop, why, back)
            lost = [h for h in self.all_hosts if h in self.lost]  # probed with the attempt's hosts
            if stop is None and drain_at is None and now() >= next_probe:
                next_probe = now() + self.s.probe_every
                answers = self.probe(list(hosts) + lost)
                for host in hosts:  # a device that stops answering (cable pulled) ends the attempt
                    misses[host] = 0 if answers.get(host, False) else misses.get(host, 0) + 1
                if max(misses.values(), default=0) >= self.s.probe_misses:
                    job.kill()
                    return AttemptEnd(None, None, "unreachable")
                answering = [h for h in lost if answers.get(h, False) and self._usable(h, silent=
                                                                                    self.lost[h].fault == "silent")]
                new = [h for h in answering if h not in self._returned_at]
                if new:
                    self.launcher.cleanup(new)  # at once: an orphan there must not write
                    self.launcher.prepare(new)
                self._returned_at.update({h: now() for h in new})
            # rejoin once a returning host is ready (checked every tick, not only at probes)
            returned = [h for h in answering if self.launcher.ready(h)
                        or now() - self._returned_at[h] > self.s.ready_wait]
            if returned and running and stop is None and drain_at is None and len(hosts) < self.s.np:
                job.drain()
                drain_at, back = now(), returned
            self.clock.sleep(self.s.tick)

    def _answered_now(self) -> bool:
        """Note a new answer; close the figures of failures and rejoins that were waiting for one."""
        size = self.outputs.progress()
        if size <= self._progress:
            self._progress = size  # shrank: a resumed infer cut a torn last line; not an answer
            return False
        self._progress = size
        t = self.clock.now()
        for item in self._waiting:
            if isinstance(item, Failure):
                if item.fault_at is not None:
                    item.next_answer_ms = (t - item.fault_at) * 1000
            else:
                item["ms"] = round((t - item.pop("returned_at")) * 1000, 1)
                self.emit("rejoin", host=item["host"], ms=item["ms"])
        self._waiting = []
        self.last_answer = t
        return True

    def _infer_event(self, ev: dict) -> None:
        """Learn from infer's events: the run's shape, and in-job failures for the summary."""
        if (kind := ev.get("event")) == "start":
            self.start_info = self.start_info or dict(ev)
        elif kind == "failure":
            lag = max(0.0, time.time() - ev["t"]) if "t" in ev else 0.0  # event written -> read here
            at = self.clock.now() - lag - (ev.get("detected_ms") or 0) / 1000
            f = Failure(str(ev.get("host")), str(ev.get("fault")), ev.get("detected_ms"), "infer",
                        ev.get("t", time.time()), fault_at=at)
            self.failures.append(f)
        elif kind == "answering_again":
            for f in [f for f in self.failures if f.source == "infer" and f.next_answer_ms is None][-1:]:
                f.next_answer_ms = ev.get("after_failure_ms")

    def _mark_lost(self, end: AttemptEnd, hosts: Sequence[str]) -> list[str]:
        """After a failed attempt: hosts that do not answer a probe are lost; infer's silent hosts are
        failures too but, if they answer (one frozen rank on a live board), cleaned up and used again.
        Returns the hosts lost before that answer again (they rejoin)."""
        silent = list((end.stop or {}).get("silent_hosts") or [])
        earlier = [h for h in self.all_hosts if h in self.lost]
        answers = self.probe(list(hosts) + earlier)
        for host in hosts:
            if host not in silent and answers.get(host, False):
                continue
            fault = "silent" if host in silent or end.reason in ("stalled", "unreachable") else "lost daemon"
            seen = [f for f in self.failures[self._attempt_failures:] if f.host == host and f.source == "infer"]
            if seen:  # infer timed it (its deadline): one entry, its figures
                (f := seen[-1]).fault, f.source = fault, "infer+launcher"
            else:  # from outside: the fault happened after the last answer
                since = None if self.last_answer is None else (self.clock.now() - self.last_answer) * 1000
                f = Failure(host, fault, since, fault_at=self.last_answer)
                self.failures.append(f)
            self._waiting.append(f)
            if not (answers.get(host, False) and self._usable(host, silent=host in silent)):
                self.lost[host] = f
            self.emit("host_lost", host=host, fault=fault, detected_ms=_ms(f.detected_ms),
                      excluded=host in self.lost)
        back = [h for h in earlier if answers.get(h, False) and self._usable(h, self.lost[h].fault == "silent")]
        return [h for h in back if self._returned_at.setdefault(h, self.clock.now()) is not None]

    def _usable(self, host: str, silent: bool) -> bool:
        """A host that answers a probe can run ranks, unless it went silent and its processes still do
        not run (a frozen board whose agent gets in: it stays out until it thaws)."""
        return not silent or self.launcher.responsive(host)

    def _rejoin(self, hosts: Sequence[str]) -> None:
        """Lost hosts that answer again are back for the next attempt; time them to its first answer."""
        for host in hosts:
            lost = self.lost.pop(host)
            item = {"host": host, "lost_at": round(lost.wall_detected, 3),
                    "returned_at": self._returned_at.pop(host, self.clock.now())}
            self.rejoins.append(item)
            self._waiting.append(item)

    def _complete(self) -> bool:
        return self._todo() in (None, 0)

    def _todo(self) -> int | None:
        images = self.start_info.get("images")
        return None if images is None else max(0, images - self.outputs.answered())


def _code(stop: dict | None, mpirun_code: int | None) -> int | None:
    """infer's exit code is in its stop event; without one, mpirun's 0 means nothing (a lost daemon
    ends mpirun with 0)."""
    if stop is not None and stop.get("exit_code") is not None:
        return int(stop["exit_code"])
    return None if mpirun_code in (0, None) else mpirun_code
