"""Static and Dynamic runs: every rank computes its channel slice of every layer; the slices are
exchanged (allgather) between layers and the partial logits gathered and summed on rank 0.

The baselines' failure behaviour, as the paper describes it: Static stops at any failure; Dynamic
goes on at a smaller width when it loses a slice other than slice 0 (width = the prefix of slices still
alive) and stops when slice 0 (the coordinator's) is lost. Stopping is clean: every answer so far is
kept, one line says what was lost, every survivor exits 3, and the summary is written (by rank 0, or by
the lowest survivor when rank 0 is the one lost). Every collective has a deadline (``rank_timeout``); on
a stall the liveness policy kills what this host sees frozen, and otherwise the run stops.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from ..errors import ExitCode, PeerFailure, RecoveryFailed
from ..model.partition import dynamic_width, narrow
from .events import EventLog, FailureTracker
from .faults import FaultInjector
from .liveness import Liveness, coordinator_silence_limit
from .outputs import PredictionSink
from .inputs import ARRIVAL_WAIT_S, InputStream
from .liveness import keepalive_interval
from .protocol import CMD_PING, CMD_RUN, CMD_STOP, STOP_FLUSH_S, RunSpec, Outcome, header
from .transport import Transport, recover
from .worker import WorkerEnd, stop_worker

logger = logging.getLogger("fluid_mpi.runtime")


class SlicedRun:
    """One rank's part of a Static/Dynamic run (rank 0 also coordinates)."""

    def __init__(self, transport: Transport, part, job: RunSpec, liveness: Liveness, sink: PredictionSink | None = None,
                 events: EventLog | None = None):
        self.t, self.full_part, self.job, self.sink = transport, part, job, sink
        self.liveness, self.events = liveness, events or EventLog(None)
        self.tracker = FailureTracker(self.events, liveness.hosts, job.stamp_dir, time.time())
        self.injector = FaultInjector(job.faults, transport.world_rank(), job.stamp_dir)
        self.width = job.width or part.width
        self.parts = {part.width: part}
        self.answered = 0
        self.message = ""
        self.silent_s = 0.0  # a worker's time waiting on a coordinator it cannot observe

    def part_at(self, width: int):
        if width not in self.parts:
            self.parts[width] = narrow(self.full_part, width)
        return self.parts[width]

    def forward(self, x: torch.Tensor, width: int) -> np.ndarray | None:
        """The distributed forward; ranks at or beyond ``width`` contribute zeros to the exchanges."""
        active = self.t.rank < width
        part = self.part_at(width) if active else None
        shared, last = x, self.full_part.n_stages - 1
        for i in range(last + 1):
            if active:
                with torch.inference_mode():
                    mine = part.stage(i, shared).numpy()
            else:
                mine = np.zeros(self._shape(i, len(x)), np.float32)
            if i < last:
                full = self.t.allgather(mine, self.job.rank_timeout, self._on_stall)[:width]  # (width, n, c, h, w)
                shared = torch.from_numpy(np.concatenate(list(full), axis=1))
            else:
                gathered = self.t.gather(mine, self.job.rank_timeout, self._on_stall)
                return None if gathered is None else gathered[:width].sum(0)
        return None

    def _on_stall(self) -> bool:
        """A collective stalled for ``rank_timeout``: True to keep waiting. The coordinator kills peers it
        sees frozen on its host (ULFM then reports them); a worker kills a frozen coordinator on its host,
        and waits for one it cannot observe up to the silence limit."""
        me = self.t.world_rank()
        if me == self.t.world_rank(0):
            killed = self.liveness.kill_stopped([w for w in self.t.members if w != me])
            for w in killed:
                self.events.emit("kill", rank=w, host=self.liveness.host(w), pid=self.liveness.hosts[w][1],
                                 reason=f"stopped, and a collective stalled for {self.job.rank_timeout:g} s")
            return bool(killed)
        coordinator = self.t.world_rank(0)
        if self.liveness.lost(coordinator):
            return self.liveness.kill(coordinator)
        self.silent_s += self.job.rank_timeout
        return self.silent_s < coordinator_silence_limit(self.job.rank_timeout)

    def _shape(self, stage: int, n: int) -> tuple:
        return self.full_part.stage_shape(stage, n)

    # --- coordinator ------------------------------------------------------------------------------
    def coordinate(self, stream: InputStream | None = None) -> Outcome:
        job = self.job
        stream = stream or InputStream.replay(job.images, job.labels, job.indices)
        n_batches = -(-(stream.total or 0) // job.batch_size)  # 0 when unknown (stdin)
        status, t0, b, quiet_since = "ok", time.perf_counter(), None, time.monotonic()
        stream.start()
        while True:
            try:
                if b is None:
                    stream.poll()
                    if stream.errors:
                        self.sink.write_errors(stream.errors)
                        stream.errors = []
                    b = stream.take(job.batch_size)
                    if b is None:
                        if stream.finished():
                            break
                        if time.monotonic() - quiet_since > keepalive_interval(job.rank_timeout):
                            self.t.bcast(header(CMD_PING, 0, 0, 0, 0), job.rank_timeout, self._on_stall)
                            quiet_since = time.monotonic()
                        stream.wait(ARRIVAL_WAIT_S)
                        continue
                self.t.bcast(header(CMD_RUN, b.bid, len(b), self.width, n_batches), job.rank_timeout,
                             self._on_stall)
                self.t.bcast(np.ascontiguousarray(b.images), job.rank_timeout, self._on_stall)
                logits = self.forward(self.full_part.spec.to_tensor(b.images), self.width)
                self.sink.write(b, logits, self.t.world_rank(), {"width": self.width})
                self.tracker.answered()
                b, quiet_since = None, time.monotonic()
                self.answered += 1
                self.injector.tick(n_batches)
            except TimeoutError:
                status = self._stop(f"a rank did not answer within {job.rank_timeout:g} s and could "
                                    f"not be killed; the {job.family} DNN cannot go on")
                break
            except (PeerFailure, RecoveryFailed) as exc:
                if not self._recover(exc):  # on success the same batch is run again at the new width
                    status = "failed"
                    break
        elapsed = time.perf_counter() - t0
        if status == "ok":
            self._broadcast_stop(0)
        return Outcome(elapsed, self.t.size, status, self.message, width_end=self.width)

    def _broadcast_stop(self, code: int) -> None:
        try:
            self.t.bcast(header(CMD_STOP, 0, 0, code, 0), STOP_FLUSH_S)
        except (PeerFailure, TimeoutError):
            pass

    def _stop(self, message: str) -> str:
        self.message = message
        logger.warning(f"fluid-mpi: {message}")
        self.t.revoke()  # wake every rank waiting in a collective; they exit on their own
        return "failed"

    def _recover(self, exc: Exception) -> bool:
        """After a failure: shrink, then go on at a smaller width (Dynamic) or stop. True to go on."""
        if isinstance(exc, RecoveryFailed):
            self._stop(str(exc))
            return False
        t_detect = time.time()
        try:
            lost = recover(self.t, self.liveness, self.job.rank_timeout, self.events)
        except RecoveryFailed as again:
            self._stop(str(again))
            return False
        self.tracker.lost(lost, t_detect, {}, self.answered, killed=self.liveness.killed)
        new_width = dynamic_width(self.t.members, self.width) if self.job.family == "dynamic" else 0
        lost_txt = ", ".join(f"rank {w} (slice {w})" for w in lost)
        if new_width == 0:
            self.message = (f"lost {lost_txt}: the static DNN needs every slice" if self.job.family == "static"
                            else f"lost {lost_txt}: slice 0 is gone")
            logger.error(f"fluid-mpi: {self.message}; stopping after {self.answered} batches")
            self._broadcast_stop(ExitCode.STOPPED)
            return False
        logger.warning(f"fluid-mpi: lost {lost_txt}; dynamic DNN continues at width {new_width} "
                       f"(was {self.width})")
        self.events.emit("width_switch", width=new_width, was=self.width, after_batch=self.answered)
        self.width = new_width
        return True

    # --- worker -----------------------------------------------------------------------------------
    def serve(self) -> WorkerEnd:
        """A worker's loop."""
        hdr = np.zeros(5, np.int64)  # [cmd, batch, n, width (exit code with STOP), batches in the run]
        lost_all: list[int] = []
        while True:
            try:
                self.t.bcast(hdr, self.job.rank_timeout, self._on_stall)
                self.silent_s = 0.0
                cmd, batch, n, width, n_batches = (int(v) for v in hdr)
                if cmd == CMD_STOP:
                    return WorkerEnd(width)  # the exit code travels in the width field
                if cmd == CMD_PING:
                    continue
                spec = self.full_part.spec
                imgs = self.t.bcast(np.empty((n, *spec.image_shape), np.uint8), self.job.rank_timeout, self._on_stall)
                self.forward(spec.to_tensor(imgs), width)
                self.answered += 1
                self.injector.tick(n_batches)
            except TimeoutError:
                return stop_worker(f"rank {self.t.world_rank()}: the coordinator has been silent for "
                                   f"{coordinator_silence_limit(self.job.rank_timeout):g} s")
            except PeerFailure:
                try:
                    lost_all += recover(self.t, self.liveness, self.job.rank_timeout)
                except RecoveryFailed as exc:
                    return stop_worker(f"rank {self.t.world_rank()}: {exc}")
                if 0 in lost_all:
                    logger.error(f"fluid-mpi: rank {self.t.world_rank()}: slice 0 / coordinator lost; stopping")
                    return WorkerEnd(ExitCode.STOPPED, coordinator_lost=True, lost=lost_all)
                if self.job.family == "static":
                    hdr[:] = 0
                    continue  # the coordinator's STOP follows on the shrunk communicator
