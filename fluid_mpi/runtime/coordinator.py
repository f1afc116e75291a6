"""Rank 0's loop for Fluid runs, over any :class:`~fluid_mpi.runtime.transport.Transport` (tests pass
a fake one).

- HT: each worker holds up to ``credit`` batches; a reply is its request for more, so a slow device
  gets fewer batches. Between replies the coordinator classifies batches of its own.
- HA: every batch goes to every rank; the coordinator adds its own group's features and applies the
  head of the groups that answered.
- On a :class:`PeerFailure` the one recovery path runs (``transport.recover``) and every batch in flight is
  re-sent to the survivors; answered batches keep their answers. A worker that holds a batch past
  ``rank_timeout`` is lost by the liveness policy: killed out of band so ULFM reports it, or, when that
  fails, the run stops with status ``silent`` (exit 4) naming its host.
- A drain request (SIGUSR2, from ``fluid-mpi launch``) stops taking new batches, finishes those in flight
  and stops with status ``drained`` (exit 5): a safe point to relaunch with a device that came back.
"""
from __future__ import annotations

import sys
import time
from collections import OrderedDict, deque
from typing import Callable

import numpy as np
import torch

from ..errors import DeviceSilent, PeerFailure, RecoveryFailed
from ..model.data import to_tensor_batch
from .events import EventLog, FailureTracker
from .faults import FaultInjector
from .liveness import Liveness
from .outputs import PredictionSink
from .protocol import CMD_FEATURES, CMD_LOGITS, CMD_STOP, STOP_FLUSH_S, Job, Outcome, header
from .scheduler import WorkQueue, expected_share, fluid_subset
from .transport import Backoff, Transport, recover


class FluidCoordinator:
    """State of one coordinator run; :meth:`run` returns the run's :class:`Outcome`."""

    def __init__(self, transport: Transport, part, job: Job, sink: PredictionSink, liveness: Liveness,
                 events: EventLog, draining: Callable[[], bool] = lambda: False):
        self.t, self.part, self.job, self.sink = transport, part, job, sink
        self.liveness, self.events, self.draining = liveness, events, draining
        self.me = transport.world_rank()
        self.dim = part.widths.hidden if job.mode == "ha" else 10
        self.tracker = FailureTracker(events, liveness.hosts, job.stamp_dir, time.time())
        self.injector = FaultInjector(job.faults, self.me, job.stamp_dir)
        self.idle = Backoff()
        self.last_contact: dict[int, float] = {}
        self.handles: dict[int, object] = {}
        self.answered_batches = 0
        # batch -> when it was handed out first (closed loop: an input is handed to the coordinator when
        # its batch is taken from the queue); a batch re-sent after a failure keeps its first time
        self.started: dict[int, float] = {}

    # --- helpers ------------------------------------------------------------------------------------
    def workers(self) -> list[int]:
        """World ranks of the current workers (everyone but me)."""
        return [w for w in self.t.members if w != self.me]

    def post(self, world: int) -> None:
        self.handles[world] = self.t.recv_start(self.t.members.index(world), self.job.batch_size * self.dim,
                                                row=self.dim)

    def send_batch(self, world: int, batch: int, cmd: int) -> None:
        self.started.setdefault(batch, time.monotonic())
        imgs = self.job.images[self.job.rows(batch)]
        self.t.send(self.t.members.index(world), header(cmd, batch, len(imgs), self.job.n_batches),
                    imgs.reshape(-1))

    def compute(self, batch: int, features: bool) -> torch.Tensor:
        self.started.setdefault(batch, time.monotonic())
        x = to_tensor_batch(self.job.images[self.job.rows(batch)])
        with torch.no_grad():
            return self.part.features(x) if features else self.part.logits(x)

    def record(self, batch: int, logits: np.ndarray, rank: int, extra: dict | None = None) -> None:
        rows = self.job.rows(batch)
        self.sink.write(self.job.indices[rows], self.job.labels[rows], logits, rank, extra,
                        self.started.pop(batch, None))
        self.answered_batches += 1
        self.tracker.answered()

    def reply(self, world: int):
        """(batch, payload rows) of a completed reply, and re-post the receive."""
        h = self.handles[world]
        batch, n = int(h.header[1]), int(h.header[2])
        out = h.payload[:n * self.dim].reshape(n, self.dim).copy()
        self.last_contact[world] = time.time()
        self.post(world)
        return batch, out

    def on_failure(self) -> None:
        t_detect = time.time()
        lost = recover(self.t, self.liveness, self.job.rank_timeout, self.events)
        self.tracker.lost(lost, t_detect, self.last_contact, None, killed=self.liveness.killed)
        for w in lost:
            print(f"fluid-mpi: rank {w} failed; continuing on {len(self.t.members)} rank(s)", file=sys.stderr,
                  flush=True)
        self.handles = {}
        for w in self.workers():
            self.post(w)

    def check_overdue(self, overdue: list[int]) -> None:
        """The liveness policy for workers that held a batch past the deadline: kill them out of band
        (ULFM then reports the death); raise DeviceSilent for those that cannot be excluded."""
        for w in overdue:
            if w not in self.liveness.killed and w not in self.liveness.unkillable:
                ok = self.liveness.kill(w)
                host, pid = self.liveness.hosts.get(w, ("?", 0))
                self.events.emit("kill", rank=w, host=host, pid=pid, delivered=ok,
                                 reason=f"held a batch for more than {self.job.rank_timeout:g} s")
        silent = self.liveness.silent(self.workers())
        if silent:
            hosts = sorted({self.liveness.host(w) for w in silent})
            self.tracker.lost(silent, time.time(), self.last_contact, None, fault="silent")
            raise DeviceSilent(f"rank(s) {silent} on {', '.join(hosts)} silent and could not be excluded "
                               "in-job; relaunch without them (fluid-mpi launch does)", silent, hosts)

    # --- the two modes ------------------------------------------------------------------------------
    def run(self) -> Outcome:
        for w in self.workers():
            self.post(w)
        t0 = time.perf_counter()
        try:
            drained = self._run_ht() if self.job.mode == "ht" else self._run_ha()
        except (RecoveryFailed, DeviceSilent) as exc:
            print(f"fluid-mpi: {exc}", file=sys.stderr, flush=True)
            self.t.revoke()  # wake the workers: they stop within their own deadlines
            silent = tuple(exc.hosts) if isinstance(exc, DeviceSilent) else ()
            return Outcome(time.perf_counter() - t0, len(self.t.members), "silent" if silent else "failed",
                           str(exc), silent_hosts=silent)
        elapsed = time.perf_counter() - t0
        try:
            for w in self.workers():
                self.t.send(self.t.members.index(w), header(CMD_STOP, 0, 0, 0), np.zeros(0, np.uint8))
            self.t.flush_sends(STOP_FLUSH_S)
        except PeerFailure:
            pass  # a worker lost after the last answer: every input is answered, it has nothing to stop
        status = "drained" if drained else "ok"
        return Outcome(elapsed, len(self.t.members), status,
                       "stopped at a safe point on request" if drained else "")

    def _drain_requested(self, pending: deque) -> bool:
        if pending and self.draining():
            self.events.emit("drain", left=len(pending))
            return True
        return False

    def _run_ht(self) -> bool:
        job = self.job
        q = WorkQueue(job.n_batches)
        mine = expected_share(job.n_batches, self.t.size, "ht")
        drained = False
        while not (q.finished() or (drained and q.idle())):
            try:
                if not drained and self._drain_requested(q.pending):
                    drained = True
                    q.pending.clear()
                for w in self.workers():
                    while q.load(w) < job.credit and q.has_pending():
                        self.send_batch(w, q.take(w), CMD_LOGITS)
                got = False
                for w in self.workers():
                    if self.t.ready(self.handles[w]):
                        batch, logits = self.reply(w)
                        got = True
                        if q.complete(w, batch):
                            self.record(batch, logits, w)
                if q.has_pending():  # my own share, while the workers compute theirs
                    batch = q.take(self.me)
                    logits = self.compute(batch, features=False).numpy()
                    q.complete(self.me, batch)
                    self.record(batch, logits, self.me)
                    self.injector.tick(mine)
                    got = True
                if got:
                    self.idle.reset()
                else:
                    self.idle.pause()
                self.check_overdue([w for w in q.overdue(job.rank_timeout) if w != self.me])
            except PeerFailure:
                self.on_failure()
                q.requeue_all()
        return drained

    def _run_ha(self, depth: int = 2) -> bool:
        """``depth`` batches in flight: the next batch is already at the workers while this one's features
        come back (one more gave no gain: the workers compute one batch at a time)."""
        job = self.job
        pending = deque(range(job.n_batches))
        inflight: OrderedDict[int, dict] = OrderedDict()  # batch -> {world rank: features}
        sent_at: dict[int, float] = {}
        subset = fluid_subset(self.t.members)
        drained = False
        while pending or inflight:
            try:
                if not drained and self._drain_requested(pending):
                    drained = True
                    pending.clear()
                while len(inflight) < depth and pending:
                    batch = pending.popleft()
                    for w in self.workers():
                        self.send_batch(w, batch, CMD_FEATURES)
                    inflight[batch], sent_at[batch] = {}, time.monotonic()
                    self.started.setdefault(batch, sent_at[batch])
                got = False
                for w in self.workers():
                    if self.t.ready(self.handles[w]):
                        batch, feats = self.reply(w)
                        got = True
                        if batch in inflight:
                            inflight[batch][w] = torch.from_numpy(feats)
                mine = next((b for b, f in inflight.items() if self.me not in f), None)
                if mine is not None:
                    inflight[mine][self.me] = self.compute(mine, features=True)
                    got = True
                oldest = next(iter(inflight), None)
                if oldest is not None and len(inflight[oldest]) == len(self.t.members):
                    feats = inflight.pop(oldest)
                    with torch.no_grad():
                        logits = self.part.bank.logits(feats, job.combine).numpy()
                    self.record(oldest, logits, self.me, {"groups": "+".join(map(str, sorted(feats)))})
                    self.injector.tick(job.n_batches)
                if got:
                    self.idle.reset()
                else:
                    self.idle.pause()
                late = next(iter(inflight), None)
                if late is not None and time.monotonic() - sent_at[late] > job.rank_timeout:
                    self.check_overdue([w for w in self.workers() if w not in inflight[late]])
            except PeerFailure:
                self.on_failure()
                pending.extendleft(reversed(list(inflight)))
                inflight.clear()
                new = fluid_subset(self.t.members)
                self.events.emit("head_switch", head="+".join(map(str, new)), was="+".join(map(str, subset)),
                                 after_batch=self.answered_batches)
                subset = new
        return drained
