"""Rank 0's loop for Fluid runs, over any :class:`~fluid_mpi.runtime.transport.Transport` (tests pass a
fake one). One loop serves both modes batch by batch, so ``--mode auto`` can switch between them: in HT each
worker holds up to ``credit`` batches (a reply is its request for more, so a slow device gets fewer) and rank 0
classifies batches of its own in between; in HA every batch goes to every rank (up to ``ha_depth`` in flight)
and rank 0 applies the head of the groups that answered (with ``--ha-deadline-ms``, those in by the deadline:
runtime/deadline.py); in auto the ``ModePolicy`` picks each new batch's mode.
On a :class:`PeerFailure` the one recovery path runs and every batch in flight is re-sent to the survivors; a
worker holding a batch past ``rank_timeout`` is killed out of band (ULFM then reports it) or, failing that, the
run stops with status ``silent`` (exit 4). A drain request (SIGUSR2) finishes the batches in flight and stops
with status ``drained`` (exit 5). docs/architecture.md shows the messages.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from typing import Callable

import numpy as np
import torch

from ..errors import DeviceSilent, PeerFailure, RecoveryFailed
from . import watchdog
from .deadline import HADeadline
from .events import EventLog, FailureTracker
from .faults import FaultInjector
from .capacity import Capacity, ServiceClock
from .inputs import ARRIVAL_WAIT_S, Batch, InputStream
from .liveness import Liveness, keepalive_interval
from .outputs import PredictionSink
from .protocol import CMD_FEATURES, CMD_LOGITS, CMD_PING, CMD_STOP, STOP_FLUSH_S, RunSpec, Outcome, header
from .scheduler import expected_share, fluid_subset, ha_depth, ht_credit, ht_hold
from .transport import Backoff, Transport, recover

logger = logging.getLogger("fluid_mpi.runtime")


class FluidCoordinator:
    """State of one coordinator run; :meth:`run` returns the run's :class:`Outcome`."""

    def __init__(self, transport: Transport, part, job: RunSpec, sink: PredictionSink, liveness: Liveness,
                 events: EventLog, draining: Callable[[], bool] = lambda: False,
                 stream: InputStream | None = None, policy=None, rates: tuple[float, float] = (1.0, 1.0),
                 clock: Callable[[], float] = time.monotonic, credit: int | None = None):
        """``policy``: a ModePolicy for ``--mode auto``; ``rates``: images/s of one sub-network's features
        and logits measured at warm-up (the policy's capacity estimates); ``clock``: the loop's monotonic
        clock (deadlines, latencies, the policy's time); ``credit``: batches an HT worker may hold (default
        :func:`~fluid_mpi.runtime.scheduler.ht_credit` of the batch size). Event times stay wall-clock."""
        self.clock = clock
        self.t, self.part, self.job, self.sink = transport, part, job, sink
        self.liveness, self.events, self.draining, self.policy = liveness, events, draining, policy
        self.rates = rates
        self.stream = stream or InputStream.replay(job.images, job.labels, job.indices)
        self.me = transport.world_rank()
        self.tracker = FailureTracker(events, liveness.hosts, job.stamp_dir, time.time())
        self.injector = FaultInjector(job.faults, self.me, job.stamp_dir)
        self.idle = Backoff()
        self.last_contact: dict[int, float] = {}
        self.handles: dict[int, object] = {}
        self.answered_batches = 0
        self.batches: dict[int, Batch] = {}  # bid -> batch, while in flight
        self.retry: deque[Batch] = deque()  # in flight at a failure: re-sent first
        self.ht: dict[int, dict[int, float]] = {}  # worker -> {bid: when sent}
        self.ha: OrderedDict[int, dict] = OrderedDict()  # bid -> {world rank: features}
        self.ha_sent: dict[int, tuple[float, float]] = {}  # bid -> ha_clock.stamp(when sent)
        # --ha-deadline-ms: HA answers with the groups that arrived in time (runtime/deadline.py)
        self.deadline = HADeadline(job.ha_deadline_ms / 1000, events.emit) if job.ha_deadline_ms else None
        self.mode = "ht" if job.mode == "ht" else "ha"
        self.ha_depth = ha_depth(job.batch_size)
        self.credit = ht_credit(job.batch_size) if credit is None else credit
        self.by_mode = {"ha": 0, "ht": 0}
        self.subset = fluid_subset(self.t.members)
        self.last_ping = self.clock()
        self.decided = False
        self.ha_capacity: Capacity | None = None  # auto: HA's service-time model (probe, then live)
        self.ha_clock = ServiceClock()
        total = -(-(self.stream.total or 0) // job.batch_size)  # batches in the run (0: unknown, stdin)
        self.n_batches = total
        self.expected = max(1, expected_share(total, self.t.size, job.mode))

    def workers(self) -> list[int]:
        """World ranks of the current workers (everyone but me)."""
        return [w for w in self.t.members if w != self.me]

    def post(self, world: int) -> None:
        dim = max(self.part.widths.hidden, self.part.spec.num_classes)  # features (HA) or logits (HT)
        self.handles[world] = self.t.recv_start(self.t.members.index(world), self.job.batch_size * dim)

    def send(self, world: int, b: Batch, cmd: int) -> None:
        self.t.send(self.t.members.index(world), header(cmd, b.bid, len(b), self.n_batches), b.images.reshape(-1))

    def next_batch(self) -> Batch | None:
        b = self.retry.popleft() if self.retry else self.stream.take(self.job.batch_size)
        if b is not None:
            self.batches[b.bid] = b
        return b

    def compute(self, b: Batch, features: bool) -> torch.Tensor:
        x = self.part.spec.to_tensor(b.images)
        with torch.inference_mode():
            return self.part.features(x) if features else self.part.logits(x)

    def record(self, b: Batch, logits: np.ndarray, rank: int, mode: str, extra: dict | None = None,
               sent: tuple[float, float] | None = None) -> None:
        self.sink.write(b, logits, rank, {"mode": mode, **(extra or {})})
        del self.batches[b.bid]
        self.answered_batches += 1
        self.by_mode[mode] += 1
        self.tracker.answered()
        if self.policy is not None and sent is not None:
            self.measure(len(b), sent)

    def measure(self, images: int, sent: tuple[float, float]) -> None:
        """auto: HA's capacity, live, from this HA batch's busy time at the coordinator (:class:`ServiceClock`;
        not while HT batches are in flight: the time then went to those too), and what HA served."""
        now = self.clock()
        seconds = self.ha_clock.answered(sent, now, saturated=self.stream.backlog > 0)
        self.policy.observe_served(now, images)
        if self.ha_capacity is not None and not any(self.ht.values()):
            self.policy.set_capacity(ha_capacity=self.ha_capacity.update(images, seconds))

    def on_failure(self) -> None:
        t_detect, before = time.time(), len(self.t.members)
        lost = recover(self.t, self.liveness, self.job.rank_timeout, self.events)
        self.tracker.lost(lost, t_detect, self.last_contact, None, killed=self.liveness.killed)
        for w in lost:
            logger.warning("fluid-mpi: rank %d failed; continuing on %d rank(s)", w, len(self.t.members))
        # messages across a shrink are lost: every batch in flight is re-sent, oldest first
        self.retry.extendleft(sorted(self.batches.values(), key=lambda b: b.bid, reverse=True))
        self.batches, self.ht, self.ha, self.handles, self.ha_sent = {}, {}, OrderedDict(), {}, {}
        if self.deadline is not None:
            self.deadline.forget()
        for w in self.workers():
            self.post(w)
        new = fluid_subset(self.t.members)
        if new != self.subset and self.job.mode != "ht":  # fixed HT uses each group's own head
            self.events.emit("head_switch", head="+".join(map(str, new)), was="+".join(map(str, self.subset)),
                             after_batch=self.answered_batches)
            self.subset = new
        if self.policy is not None:  # a membership change: HA's time per batch stays (each rank its own
            # group, side by side); HT's capacity scales with the ranks left
            self.policy.reset(self.policy.ha_capacity, self.policy.ht_capacity * len(self.t.members) / before)
            self.ha_clock.restart(self.clock())

    def choose_mode(self, now: float) -> str:
        if self.policy is None:
            return self.mode
        d = self.policy.decide(now, self.stream.backlog + sum(map(len, self.retry)), self.stream.oldest_wait(now))
        if d.changed or not self.decided:  # the first decision is logged too: a run may never switch
            self.events.emit("mode_switch", **d.event(), after_batch=self.answered_batches)
            self.decided = True
        self.mode = d.mode
        return d.mode

    def keep_alive(self, now: float) -> None:
        """Idle: ping the workers now and then, lest they take a quiet stream for a lost coordinator."""
        if now - self.last_ping > keepalive_interval(self.job.rank_timeout):
            self._tell_all(CMD_PING)
            self.last_ping = now

    def _tell_all(self, cmd: int) -> None:
        for w in self.workers():
            self.t.send(self.t.members.index(w), header(cmd, 0, 0, 0), np.zeros(0, np.uint8))

    def run(self) -> Outcome:
        for w in self.workers():
            self.post(w)
        if self.policy is not None:
            from .probe import first_capacities

            self.ha_capacity = first_capacities(self)
        t0 = self.clock()
        self.stream.start(self.clock())
        if self.policy is not None:
            self.policy.begin(self.clock())
        try:
            drained = self._loop()
        except (RecoveryFailed, DeviceSilent) as exc:
            logger.error("fluid-mpi: %s", exc)
            self.t.revoke()  # wake the workers: they stop within their own deadlines
            silent = tuple(exc.hosts) if isinstance(exc, DeviceSilent) else ()
            return Outcome(self.clock() - t0, len(self.t.members), "silent" if silent else "failed",
                           str(exc), silent_hosts=silent)
        elapsed = self.clock() - t0
        if self.policy is not None:  # the live estimates the run ended with, beside the probe's first ones
            self.events.emit("capacity", ha_per_s=round(self.policy.ha_capacity, 1),
                             ht_per_s=round(self.policy.ht_capacity, 1), at="end")
        try:
            self._tell_all(CMD_STOP)
            self.t.flush_sends(STOP_FLUSH_S)
        except PeerFailure:
            pass  # a worker lost after the last answer: every input is answered, it has nothing to stop
        status = "drained" if drained else "ok"
        return Outcome(elapsed, len(self.t.members), status,
                       "stopped at a safe point on request" if drained else "")

    def _loop(self) -> bool:
        drained = False
        # --ha-deadline-ms: a late device may still hold answered batches; its features are awaited (and
        # dropped) before STOP, so that it is not told to stop mid-send (the watchdog bounds the wait)
        while self.batches or self.retry or not (drained or self.stream.finished()) or \
                (self.deadline is not None and self.deadline.holding()):
            try:
                now = self.clock()
                if not drained:
                    arrived = self.stream.poll(now)
                    if self.policy is not None:
                        self.policy.observe_arrivals(now, arrived)
                    if self.stream.errors:
                        self.sink.write_errors(self.stream.errors)
                        self.stream.errors = []
                    if self.draining():
                        drained = True
                        self.events.emit("drain", in_flight=len(self.batches))
                        self.retry.clear()
                got = self._step(self.choose_mode(now) if not drained else self.mode, drained)
                if got:
                    self.idle.reset()
                elif not self.batches and not self.retry and self.stream.backlog == 0 and not drained:
                    self.keep_alive(now)
                    self.stream.wait(ARRIVAL_WAIT_S)
                else:
                    self.idle.pause()
                if not got:  # a pass that found nothing to do: waiting, not HA's work
                    self.ha_clock.waited(self.clock() - now)
                watchdog.enforce(self, watchdog.overdue(self, self.clock()))
            except PeerFailure:
                self.on_failure()
        return drained

    def _step(self, mode: str, drained: bool) -> bool:
        """Collect, hand out, compute and record what can be; True when anything happened. The hand-out
        follows the replies, before this rank's own forward: sent after it, a batch left its worker idle."""
        got = False
        for w in self.workers():
            while self.t.ready(self.handles[w]):  # at most credit (HT) or the HA depth, plus stale replies
                got = True
                self._reply(w)
        self._combine()
        now = self.clock()
        new = (lambda: None) if drained else self.next_batch
        if mode == "ht":
            waiting = -(-self.stream.backlog // self.job.batch_size) + len(self.retry)
            held = ht_hold(self.credit, waiting, len(self.t.members))
            for w in self.workers():
                mine = self.ht.setdefault(w, {})
                while len(mine) < held and (b := new()) is not None:
                    self.send(w, b, CMD_LOGITS)
                    mine[b.bid] = now
        else:
            while len(self.ha) < self.ha_depth and (b := new()) is not None:
                for w in self.workers() if self.deadline is None else \
                        self.deadline.send_to(b.bid, self.workers(), now, depth=self.ha_depth):
                    self.send(w, b, CMD_FEATURES)
                self.ha[b.bid], self.ha_sent[b.bid] = {}, self.ha_clock.stamp(now)
        mine = next((bid for bid, f in self.ha.items() if self.me not in f), None)
        if mine is not None:  # my features for an HA batch come first: the workers' are on their way
            self.ha[mine][self.me] = self.compute(self.batches[mine], features=True)
            got = True
        elif mode == "ht" and (b := new()) is not None:  # my own share, while the workers compute theirs
            self.record(b, self.compute(b, features=False).numpy(), self.me, "ht")
            self.injector.tick(self.expected)
            got = True
        self._combine()
        return got

    def _combine(self) -> None:
        """Apply the head to the oldest HA batches whose features are all in, oldest first."""
        while (oldest := next(iter(self.ha), None)) is not None and self._ha_ready(oldest):
            feats = self.ha.pop(oldest)
            sent = self.ha_sent.pop(oldest)
            if self.deadline is not None:
                self.deadline.answered(oldest, set(feats), self.clock())
            with torch.inference_mode():
                logits = self.part.bank.logits(feats, self.job.combine).numpy()
            self.record(self.batches[oldest], logits, self.me, "ha", {"groups": "+".join(map(str, sorted(feats)))},
                        sent)
            self.injector.tick(self.expected)

    def _reply(self, w: int) -> None:
        h = self.handles[w]
        kind, bid, n = int(h.header[0]), int(h.header[1]), int(h.header[2])
        dim = self.part.widths.hidden if kind == CMD_FEATURES else self.part.spec.num_classes
        out = h.payload[:n * dim].reshape(n, dim)  # no copy: post() gives the next reply its own buffer
        self.last_contact[w] = time.time()
        self.post(w)
        if kind == CMD_LOGITS and self.ht.get(w, {}).pop(bid, None) is not None and bid in self.batches:
            self.record(self.batches[bid], out, w, "ht")
        elif kind == CMD_FEATURES and (self.deadline is None or self.deadline.arrived(w, bid)) and bid in self.ha:
            self.ha[bid][w] = torch.from_numpy(out)
        # anything else is a stale reply (sent before a shrink, its batch re-sent since): ignored

    def _ha_ready(self, bid: int) -> bool:
        """An HA batch can be answered: every group's features are in, or (--ha-deadline-ms) its deadline."""
        if self.deadline is None:
            return len(self.ha[bid]) == len(self.t.members)
        return self.deadline.ready(bid, set(self.ha[bid]), self.me, self.ha_sent[bid][0], self.clock())
