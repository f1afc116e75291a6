"""Rank 0's loop for Fluid runs, over any transport with the :class:`~fluid_mpi.runtime.mpi_transport.MpiTransport`
interface (tests pass a fake one).

- HT: each worker holds up to ``credit`` batches; a reply is its request for more, so a slow device
  gets fewer batches. Between replies the coordinator classifies batches of its own.
- HA: every batch goes to every rank; the coordinator adds its own group's features and applies the
  head of the groups that answered.
- On a :class:`PeerFailure` the transport recovers (revoke + shrink) and every batch in flight is
  re-sent to the survivors; answered batches keep their answers. A worker that holds a batch past
  ``rank_timeout`` is treated as frozen: killed when it is on this host (ULFM then reports it).
"""
from __future__ import annotations

import socket
import sys
import time
from collections import OrderedDict, deque

import numpy as np
import torch

from ..model.data import to_tensor_batch
from ..errors import PeerFailure
from .faults import die
from .outputs import PredictionSink
from .protocol import CMD_FEATURES, CMD_LOGITS, CMD_STOP, Job, failure_record, header, stamp_death
from .scheduler import WorkQueue, fluid_subset, split_batches


class FrozenRemote(Exception):
    """A rank on another host stopped answering; it cannot be killed from here, so the run stops."""


class FluidCoordinator:
    """State of one coordinator run; :meth:`run` returns the run's outcome for the summary."""

    def __init__(self, transport, part, job: Job, sink: PredictionSink, hosts: list[tuple[str, int]]):
        self.t, self.part, self.job, self.sink = transport, part, job, sink
        self.hosts = dict(enumerate(hosts))  # world rank -> (hostname, pid)
        self.me = transport.world_rank()
        self.batches = split_batches(list(range(len(job.indices))), job.batch_size)
        self.dim = part.widths.hidden if job.mode == "ha" else 10
        self.failures: list[dict] = []
        self.last_contact: dict[int, float] = {}
        self.handles: dict[int, object] = {}
        self.answered_batches = 0
        self.events: list[dict] = []  # subset changes etc., for the summary
        self.killed: set[int] = set()  # frozen ranks already sent SIGKILL

    # --- helpers ------------------------------------------------------------------------------------
    def workers(self) -> list[int]:
        """World ranks of the current workers (everyone but me)."""
        return [w for w in self.t.members if w != self.me]

    def comm_rank(self, world: int) -> int:
        return self.t.members.index(world)

    def post(self, world: int) -> None:
        self.handles[world] = self.t.recv_start(self.comm_rank(world), self.job.batch_size * self.dim,
                                                row=self.dim)

    def send_batch(self, world: int, batch: int, cmd: int) -> None:
        rows = self.batches[batch]
        imgs = self.job.images[rows[0]:rows[-1] + 1]
        self.t.send(self.comm_rank(world), header(cmd, batch, len(rows), len(self.batches)), imgs.reshape(-1))

    def x_of(self, batch: int) -> torch.Tensor:
        rows = self.batches[batch]
        return to_tensor_batch(self.job.images[rows[0]:rows[-1] + 1])

    def record(self, batch: int, logits: np.ndarray, rank: int, extra: dict | None = None) -> None:
        rows = self.batches[batch]
        lo, hi = rows[0], rows[-1] + 1
        self.sink.write(self.job.indices[lo:hi], self.job.labels[lo:hi], logits, rank, extra)
        self.answered_batches += 1
        plan = self.job.faults
        if plan.should_die(self.me, self.answered_batches, self.job.n_batches):
            stamp_death(self.job.stamp_dir, self.me, self.answered_batches, plan.how)
            die(plan.how)

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
        before = list(self.t.members)
        lost = self.t.recover()
        for w in lost:
            self.failures.append(failure_record(w, self.job.stamp_dir, t_detect, self.last_contact.get(w),
                                                None, self.sink.t0))
            print(f"fluid-mpi: rank {w} failed ({self.failures[-1]['how']}); continuing on "
                  f"{len(self.t.members)} of {len(before)} ranks", file=sys.stderr, flush=True)
        self.handles = {}
        for w in self.workers():
            self.post(w)

    def check_frozen(self, overdue: list[int]) -> None:
        """Kill workers that held a batch past the deadline (a frozen device), if they are on this host."""
        for w in overdue:
            if w in self.killed:
                continue  # killed already; ULFM reports it within tens of ms
            host, pid = self.hosts.get(w, ("?", 0))
            if host == socket.gethostname() and pid:
                print(f"fluid-mpi: rank {w} silent for {self.job.rank_timeout:g} s: treating it as frozen, "
                      f"killing pid {pid}", file=sys.stderr, flush=True)
                self.t.kill(pid)
                self.killed.add(w)
            else:
                raise FrozenRemote(f"rank {w} on {host} has been silent for {self.job.rank_timeout:g} s and "
                                   "cannot be killed from here; stopping (ULFM cannot exclude a live process)")

    # --- the two modes ------------------------------------------------------------------------------
    def run(self) -> dict:
        for w in self.workers():
            self.post(w)
        t0 = time.perf_counter()
        try:
            self._run_ht() if self.job.mode == "ht" else self._run_ha()
        except FrozenRemote as exc:
            print(f"fluid-mpi: {exc}", file=sys.stderr, flush=True)
            self.t.revoke()  # the workers give up within seconds (their shrink watchdog)
            return {"elapsed_s": time.perf_counter() - t0, "failures": self.failures,
                    "ranks_end": len(self.t.members), "events": self.events, "status": "failed",
                    "message": str(exc)}
        elapsed = time.perf_counter() - t0
        for w in self.workers():
            self.t.send(self.comm_rank(w), header(CMD_STOP, 0, 0, 0), np.zeros(0, np.uint8))
        self.t.flush_sends(timeout=2.0)
        return {"elapsed_s": elapsed, "failures": self.failures, "ranks_end": len(self.t.members),
                "events": self.events}

    def _run_ht(self) -> None:
        job, q = self.job, WorkQueue(len(self.batches))
        while not q.finished():
            try:
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
                    with torch.no_grad():
                        logits = self.part.logits(self.x_of(batch)).numpy()
                    q.complete(self.me, batch)
                    self.record(batch, logits, self.me)
                elif not got:
                    self.t.pause()
                self.check_frozen([w for w in q.overdue(job.rank_timeout) if w != self.me])
            except PeerFailure:
                self.on_failure()
                q.requeue_all()

    def _run_ha(self, depth: int = 2) -> None:
        job = self.job
        pending = deque(range(len(self.batches)))
        inflight: OrderedDict[int, dict] = OrderedDict()  # batch -> {world rank: features}
        sent_at: dict[int, float] = {}
        subset = fluid_subset(self.t.members)
        while pending or inflight:
            try:
                while len(inflight) < depth and pending:
                    batch = pending.popleft()
                    for w in self.workers():
                        self.send_batch(w, batch, CMD_FEATURES)
                    inflight[batch], sent_at[batch] = {}, time.monotonic()
                for w in self.workers():
                    if self.t.ready(self.handles[w]):
                        batch, feats = self.reply(w)
                        if batch in inflight:
                            inflight[batch][w] = torch.from_numpy(feats)
                mine = next((b for b, f in inflight.items() if self.me not in f), None)
                if mine is not None:
                    with torch.no_grad():
                        inflight[mine][self.me] = self.part.features(self.x_of(mine))
                oldest = next(iter(inflight), None)
                if oldest is not None and len(inflight[oldest]) == len(self.t.members):
                    feats = inflight.pop(oldest)
                    with torch.no_grad():
                        logits = self.part.bank.logits(feats, job.combine).numpy()
                    self.record(oldest, logits, self.me, {"groups": "+".join(map(str, sorted(feats)))})
                elif mine is None:
                    self.t.pause()
                if oldest is not None and time.monotonic() - sent_at[oldest] > job.rank_timeout:
                    self.check_frozen([w for w in self.workers() if w not in inflight[oldest]])
                    sent_at[oldest] = time.monotonic()
            except PeerFailure:
                self.on_failure()
                pending.extendleft(reversed(list(inflight)))
                inflight.clear()
                new = fluid_subset(self.t.members)
                self.events.append({"after_batch": self.answered_batches, "head": "+".join(map(str, new)),
                                    "was": "+".join(map(str, subset))})
                subset = new

