"""The elastic driver's decisions (the Horovod Elastic / torchrun pattern): which hosts run the next
attempt, when an attempt is over, when to relaunch, when to give up and when a returning host rejoins.

Plain Python: processes and files come in through the ``Launcher``/``Outputs`` protocols, probes through
a callable, time from a clock; tests/test_elastic.py drives it with fakes, ``runner.py`` has the real ones.
Why a driver (shared/MPI_NOTES.md): when a host's Open MPI daemon is lost PRRTE ends the whole job within
a second, and a pulled cable hangs it for minutes; a process death on a live host is ULFM's, in-job.

Each tick of an attempt is two steps: :meth:`Driver._observe` takes in what happened (events, answers,
probes) and :meth:`Driver._decide` says whether the attempt is over, and why (an :class:`EndReason`).
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

from ..errors import ExitCode
from ..runtime.events import FaultKind
from .elastic_parts import (AttemptEnd, AttemptWatch, Clock, EndReason, Failure, Job, Launcher,  # noqa: F401
                            Outputs, Settings, end_code, ms)
from .host_table import HostTable


class Driver:
    """Runs attempts until every input is answered or it gives up; see :meth:`run`."""

    def __init__(self, hosts: Sequence[str], settings: Settings, launcher: Launcher, outputs: Outputs,
                 probe: Callable[[Sequence[str]], dict[str, bool]], emit: Callable[..., None],
                 clock: Clock | None = None, interrupted: Callable[[], bool] = lambda: False):
        self.all_hosts, self.s = list(hosts), settings
        self.launcher, self.outputs, self.probe, self.emit = launcher, outputs, probe, emit
        self.clock, self.interrupted = clock or Clock(), interrupted
        self.hosts = HostTable(hosts)
        self.failures: list[Failure] = []  # every failure, for the summary
        self.rejoins, self.attempts, self.start_info = [], [], {}
        self.last_answer: float | None = None  # when the last answer was seen (monotonic)
        self._progress = 0  # the predictions file's size last seen
        self._waiting: list = []  # failures and rejoins waiting for the next answer
        self._attempt_failures = 0  # failures[this:] were reported during the current attempt

    @property
    def lost(self) -> dict[str, Failure]:
        """Hosts left out of attempts, and why."""
        return self.hosts.lost()

    def active_hosts(self) -> list[str]:
        """The hosts of the next attempt: hostfile order, lost ones left out, at most -np of them."""
        return self.hosts.active(self.s.np)

    def min_hosts(self) -> int:
        """Static needs every slice (the width it started with); Fluid and Dynamic go on with one."""
        return self.start_info.get("ranks", 1) if self.start_info.get("family") == "static" else 1

    def run(self) -> tuple[int, str]:
        """Attempts until done; returns (exit code, one-line message)."""
        restarts = attempt = 0
        while True:
            hosts = self.active_hosts()
            if len(hosts) < self.min_hosts() or not hosts:
                return ExitCode.STOPPED, f"{len(hosts)} host(s) left, {self.min_hosts()} needed"
            attempt += 1
            if attempt > 1:
                self.emit("relaunch", hosts=hosts, attempt=attempt, todo=self._todo())
            self._progress = self.outputs.progress()  # late writes of a killed attempt are not answers
            self.launcher.prepare(hosts)
            end = self.watch(self.launcher.start(hosts, attempt), hosts)
            self._answered_now()  # answers written just before the end belong to this attempt
            self.attempts.append({"attempt": attempt, "hosts": hosts, "code": end.code, "reason": end.reason})
            verdict = self._verdict(end)
            if verdict is not None:
                return verdict
            if end.returned:  # rejoin: a drained (or drain-timed-out) attempt is not a failure
                self.launcher.cleanup(list(hosts) + end.returned)  # orphans of old attempts too
                self._rejoin(end.returned)
                continue
            back = self._mark_lost(end, hosts)
            self.launcher.cleanup(list(hosts) + back)
            self._rejoin(back)
            restarts += 1
            if restarts > self.s.max_restarts:
                return ExitCode.STOPPED, f"gave up after {self.s.max_restarts} restart(s)"

    def _verdict(self, end: AttemptEnd) -> tuple[int, str] | None:
        """The run's end after this attempt, or None to go on (relaunch or rejoin)."""
        message = (end.stop or {}).get("message")
        if end.reason == EndReason.INTERRUPTED:
            self.launcher.cleanup(self.all_hosts)
            return ExitCode.INTERRUPTED, "interrupted"
        if end.code == ExitCode.OK and self._complete():
            return ExitCode.OK, "every input answered"
        if end.code == ExitCode.BAD_INPUT:
            return ExitCode.BAD_INPUT, message or "infer rejected its input"
        if end.code == ExitCode.STOPPED:
            return ExitCode.STOPPED, message or "infer stopped after a failure"
        return None

    def watch(self, job: Job, hosts: Sequence[str]) -> AttemptEnd:
        """Follow one attempt until mpirun ends, is drained, or must be killed."""
        now = self.clock.now()
        w = AttemptWatch(list(hosts), seen=now, next_probe=now + self.s.probe_every)
        self._attempt_failures = len(self.failures)
        self.hosts.new_attempt()
        while True:
            if self.interrupted():
                job.kill()
                return AttemptEnd(None, w.stop, EndReason.INTERRUPTED)
            w.exit_code = job.poll()
            if w.exit_code is None:
                self._observe(w)
            else:
                self._take_events(w)
            end = self._decide(w)
            if end is not None:
                if w.exit_code is None:
                    job.kill()
                return end
            if self._should_drain(w):
                job.drain()
                w.drain_at = self.clock.now()
                self.emit("drain_for_rejoin", hosts=w.back, ready=[h for h in w.back if self.launcher.ready(h)],
                          waited_ms=ms(1000 * (w.drain_at - min(self.hosts.state[h].returned_at for h in w.back))))
            self.clock.sleep(self.s.tick)

    # --------------------------------------------------------------------------- monitor: take in

    def _take_events(self, w: AttemptWatch) -> None:
        for ev in self.outputs.new_events():
            w.seen = self.clock.now()
            w.running = w.running or ev.get("event") == "start"
            if ev.get("event") == "stop":
                w.stop, w.stop_at = ev, self.clock.now()
            self._infer_event(ev)
        if self._answered_now():
            w.seen = self.clock.now()

    def _observe(self, w: AttemptWatch) -> None:
        """Events and answers; every probe_every the attempt's hosts (one that stops answering ends the
        attempt), every lost_probe_every the lost ones (one that answers is cleaned up, prepared at once)."""
        self._take_events(w)
        now = self.clock.now()
        if w.stop is not None or w.drain_at is not None:
            return
        due = now >= w.next_probe  # the attempt's hosts
        lost = list(self.lost) if now >= w.next_lost_probe else []
        if not due and not lost:
            return
        w.next_lost_probe = now + self.s.lost_probe_every
        if due:
            w.next_probe = now + self.s.probe_every
        answers = self.probe((w.hosts if due else []) + lost)
        if due and self.hosts.note_probe(w.hosts, answers) >= self.s.probe_misses:
            w.unreachable = True
            return
        for h in lost:
            self.hosts.state[h].answering = answers.get(h, False) and self._usable(
                h, silent=self.lost[h].fault == FaultKind.SILENT)
        new = self.hosts.mark_returned(self.hosts.answering(), now)
        if new:
            self.emit("host_back", hosts=new)
            self.launcher.cleanup(new)  # at once: an orphan there must not write
            self.launcher.prepare(new)

    # --------------------------------------------------------------------------- decide

    def _decide(self, w: AttemptWatch) -> AttemptEnd | None:
        """Whether the attempt is over, and why; None to keep watching."""
        now = self.clock.now()
        if w.exit_code is not None:
            reason = EndReason.DRAINED if w.drain_at is not None else EndReason.EXITED
            return AttemptEnd(end_code(w.stop, w.exit_code), w.stop, reason, w.back)
        if w.unreachable:
            return AttemptEnd(None, None, EndReason.UNREACHABLE)
        # a silent host's daemon cannot take part in PRRTE's teardown: no grace after exit code 4
        grace = 0.0 if (w.stop or {}).get("exit_code") == ExitCode.SILENT else self.s.stop_grace
        if w.stop_at is not None and now - w.stop_at > grace:
            why = EndReason.KILLED_AFTER_STOP
        elif w.drain_at is not None and now - w.drain_at > self.s.drain_timeout:
            why = EndReason.DRAINED
        elif w.stop is None and w.drain_at is None and now - w.seen > (
                self.s.stall_timeout if w.running else max(self.s.stall_timeout, self.s.start_timeout)):
            why = EndReason.STALLED
        else:
            return None
        return AttemptEnd(end_code(w.stop, None), w.stop, why, w.back)

    def _should_drain(self, w: AttemptWatch) -> bool:
        """Rejoin: drain the attempt once a returning host is ready (checked every tick, not only at
        probes), or has had Settings.ready_wait to get ready; only with room for it and infer running."""
        if not w.running or w.stop is not None or w.drain_at is not None or len(w.hosts) >= self.s.np:
            return False
        now = self.clock.now()
        w.back = [h for h in self.hosts.answering() if self.launcher.ready(h)
                  or now - self.hosts.state[h].returned_at > self.s.ready_wait]
        return bool(w.back)

    # --------------------------------------------------------------------------- records

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
            fault = _fault_kind(ev.get("fault"))
            self.failures.append(Failure(str(ev.get("host")), fault, ev.get("detected_ms"), "infer",
                                         ev.get("t", time.time()), fault_at=at))
        elif kind == "answering_again":
            for f in [f for f in self.failures if f.source == "infer" and f.next_answer_ms is None][-1:]:
                f.next_answer_ms = ev.get("after_failure_ms")

    def _mark_lost(self, end: AttemptEnd, hosts: Sequence[str]) -> list[str]:
        """After a failed attempt: hosts that do not answer a probe are lost; infer's silent hosts are
        failures too but, if they answer (one frozen rank on a live board), cleaned up and used again.
        Returns the hosts lost before that answer again (they rejoin)."""
        silent = list((end.stop or {}).get("silent_hosts") or [])
        earlier = list(self.lost)
        answers = self.probe(list(hosts) + earlier)
        for host in hosts:
            if host not in silent and answers.get(host, False):
                continue
            f = self._failure_of(host, FaultKind.SILENT if host in silent or end.reason in (
                EndReason.STALLED, EndReason.UNREACHABLE) else FaultKind.LOST_DAEMON)
            self._waiting.append(f)
            if not (answers.get(host, False) and self._usable(host, silent=host in silent)):
                self.hosts.state[host].lost = f
            self.emit("host_lost", host=host, fault=f.fault, detected_ms=ms(f.detected_ms),
                      excluded=host in self.lost)
        back = [h for h in earlier if answers.get(h, False) and self._usable(h, self.lost[h].fault == FaultKind.SILENT)]
        self.hosts.mark_returned(back, self.clock.now())
        return back

    def _failure_of(self, host: str, fault: FaultKind) -> Failure:
        """The failure record of a host found lost: infer's, when it timed it (its deadline), else one
        seen from outside (the fault happened after the last answer)."""
        seen = [f for f in self.failures[self._attempt_failures:] if f.host == host and f.source == "infer"]
        if seen:
            f = seen[-1]
            f.fault, f.source = fault, "infer+launcher"
            return f
        since = None if self.last_answer is None else (self.clock.now() - self.last_answer) * 1000
        f = Failure(host, fault, since, fault_at=self.last_answer)
        self.failures.append(f)
        return f

    def _usable(self, host: str, silent: bool) -> bool:
        """A host that answers a probe can run ranks, unless it went silent and its processes still do
        not run (a frozen board whose agent gets in: it stays out until it thaws)."""
        return not silent or self.launcher.responsive(host)

    def _rejoin(self, hosts: Sequence[str]) -> None:
        """Lost hosts that answer again are back for the next attempt; time them to its first answer."""
        for host in hosts:
            lost, returned_at = self.hosts.take_back(host, self.clock.now())
            item = {"host": host, "lost_at": round(lost.wall_detected, 3), "returned_at": returned_at}
            self.rejoins.append(item)
            self._waiting.append(item)

    def summary(self, code: int, message: str) -> dict:
        """The launcher's summary: outcome, attempts, every failure (host, fault as seen from outside,
        detection time, fault to next answer), every rejoin."""
        return {"exit_code": code, "message": message, "answered": self.outputs.answered(),
                "images": self.start_info.get("images"), "family": self.start_info.get("family"),
                "mode": self.start_info.get("mode"), "hosts": self.all_hosts, "lost": sorted(self.lost),
                "attempts": self.attempts, "failures": [f.record() for f in self.failures],
                "rejoins": [{k: v for k, v in r.items() if k != "returned_at"} for r in self.rejoins]}

    def _complete(self) -> bool:
        return self._todo() in (None, 0)

    def _todo(self) -> int | None:
        images = self.start_info.get("images")
        return None if images is None else max(0, images - self.outputs.answered())


def _fault_kind(value) -> FaultKind:
    """infer's ``fault`` field as a :class:`FaultKind` (an unknown or missing one: a process exit)."""
    try:
        return FaultKind(value)
    except ValueError:
        return FaultKind.PROCESS_EXIT
