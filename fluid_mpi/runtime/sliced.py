"""Static and Dynamic runs: every rank computes its channel slice of every layer; the slices are
exchanged (allgather) between layers and the partial logits gathered and summed on rank 0.

The baselines' failure behaviour, as the paper describes it: Static stops at any failure; Dynamic
goes on at a smaller width when it loses a slice other than slice 0 (width = the prefix of slices still
alive) and stops when slice 0 (the coordinator's) is lost. Stopping is clean: every answer so far is
kept, one line says what was lost, and every survivor exits non-zero.
"""
from __future__ import annotations

import socket
import sys
import time

import numpy as np
import torch

from ..model.data import to_tensor_batch
from ..errors import PeerFailure
from .faults import die, frozen
from ..model.partition import N_STAGES, narrow
from .protocol import CMD_RUN, CMD_STOP, Job, failure_record, header, stamp_death
from .scheduler import dynamic_width, split_batches

EXIT_FAILED = 3


class SlicedRun:
    """One rank's part of a Static/Dynamic run (rank 0 also coordinates)."""

    def __init__(self, transport, part, job: Job, sink=None, hosts=None):
        self.t, self.full_part, self.job, self.sink = transport, part, job, sink
        self.hosts = hosts or []
        transport.on_stall = self._kill_frozen
        self.width = job.width or part.width
        self.parts = {part.width: part}
        self.failures: list[dict] = []
        self.answered = 0
        self.message = ""

    def part_at(self, width: int):
        if width not in self.parts:
            self.parts[width] = narrow(self.full_part, width)
        return self.parts[width]

    def forward(self, x: torch.Tensor, width: int, timeout: float | None) -> np.ndarray | None:
        """The distributed forward; ranks at or beyond ``width`` contribute zeros to the exchanges."""
        active = self.t.rank < width
        part = self.part_at(width) if active else None
        shared = x
        for i in range(N_STAGES):
            if active:
                with torch.no_grad():
                    mine = part.stage(i, shared).numpy()
            else:
                mine = np.zeros(self._shape(i, len(x)), np.float32)
            if i < N_STAGES - 1:
                full = self.t.allgather(mine, timeout)[:width]  # (width, n, c, h, w)
                shared = torch.from_numpy(np.concatenate(list(full), axis=1))
            else:
                gathered = self.t.gather(mine, timeout)
                return None if gathered is None else gathered[:width].sum(0)
        return None

    def _kill_frozen(self) -> bool:
        """A collective stalled: kill ranks on this host that are frozen (SIGSTOP); ULFM then reports
        them as failed. False when there is none to kill (the caller stops the run)."""
        me = socket.gethostname()
        victims = [(r, pid) for r, (host, pid) in enumerate(self.hosts)
                   if host == me and r != self.t.world_rank() and frozen(pid)]
        for r, pid in victims:
            print(f"fluid-mpi: rank {r} frozen for {self.job.rank_timeout:g} s: killing pid {pid}",
                  file=sys.stderr, flush=True)
            self.t.kill(pid)
        return bool(victims)

    def _shape(self, stage: int, n: int) -> tuple:
        w = self.full_part.widths
        return [(n, w.c1, 12, 12), (n, w.c2, 4, 4), (n, 10)][stage]

    # --- coordinator ------------------------------------------------------------------------------
    def coordinate(self) -> dict:
        job = self.job
        batches = split_batches(list(range(len(job.indices))), job.batch_size)
        b, status, t0 = 0, "ok", time.perf_counter()
        while b < len(batches):
            rows = batches[b]
            try:
                self.t.bcast(header(CMD_RUN, b, len(rows), self.width, len(batches)), job.rank_timeout)
                imgs = np.ascontiguousarray(job.images[rows[0]:rows[-1] + 1])
                self.t.bcast(imgs, job.rank_timeout)
                logits = self.forward(to_tensor_batch(imgs), self.width, job.rank_timeout)
                self.sink.write(job.indices[rows[0]:rows[-1] + 1], job.labels[rows[0]:rows[-1] + 1], logits,
                                self.t.world_rank(), {"width": self.width})
                b += 1
                self.answered += 1
                self._maybe_die(len(batches))
            except TimeoutError:
                status = self._stop(f"a rank did not answer within {job.rank_timeout:g} s and could "
                                    f"not be killed; the {job.family} DNN cannot go on")
                break
            except PeerFailure:
                if not self._recover():
                    status = "failed"
                    break
        elapsed = time.perf_counter() - t0
        if status == "ok":
            self._broadcast_stop(0)
        return {"elapsed_s": elapsed, "failures": self.failures, "ranks_end": self.t.size,
                "status": status, "message": self.message, "width_end": self.width}

    def _maybe_die(self, n_batches: int) -> None:
        plan = self.job.faults
        me = self.t.world_rank()
        if plan.should_die(me, self.answered, n_batches):
            stamp_death(self.job.stamp_dir, me, self.answered, plan.how)
            die(plan.how)

    def _broadcast_stop(self, code: int) -> None:
        try:
            self.t.bcast(header(CMD_STOP, 0, 0, code, 0), 2.0)
        except (PeerFailure, TimeoutError):
            pass

    def _stop(self, message: str) -> str:
        self.message = message
        print(f"fluid-mpi: {message}", file=sys.stderr, flush=True)
        self.t.revoke()  # wake every rank waiting in a collective; they exit on their own
        return "failed"

    def _recover(self) -> bool:
        """After a failure: shrink, then go on at a smaller width (Dynamic) or stop. True to go on."""
        t_detect = time.time()
        lost = self.t.recover()
        for w in lost:
            self.failures.append(failure_record(w, self.job.stamp_dir, t_detect, None, self.answered,
                                                self.sink.t0 if self.sink else None))
        new_width = dynamic_width(self.t.members, self.width) if self.job.family == "dynamic" else 0
        lost_txt = ", ".join(f"rank {w} (slice {w})" for w in lost)
        if new_width == 0 or self.job.family == "static":
            self.message = (f"lost {lost_txt}: the {self.job.family} DNN needs every slice"
                            if self.job.family == "static" else f"lost {lost_txt}: slice 0 is gone")
            print(f"fluid-mpi: {self.message}; stopping after {self.answered} batches", file=sys.stderr,
                  flush=True)
            self._broadcast_stop(EXIT_FAILED)
            return False
        print(f"fluid-mpi: lost {lost_txt}; dynamic DNN continues at width {new_width} "
              f"(was {self.width})", file=sys.stderr, flush=True)
        self.width = new_width
        return True

    # --- worker -----------------------------------------------------------------------------------
    def serve(self) -> int:
        """A worker's loop; returns its exit code."""
        hdr = np.zeros(5, np.int64)  # [cmd, batch, n, width (exit code with STOP), batches in the run]
        while True:
            try:
                self.t.bcast(hdr)
                cmd, batch, n, width, n_batches = (int(v) for v in hdr)
                if cmd == CMD_STOP:
                    return width  # the exit code travels in the last field
                imgs = self.t.bcast(np.empty((n, 28, 28), np.uint8))
                self.forward(to_tensor_batch(imgs), width, None)
                self.answered += 1
                self._maybe_die(n_batches)
            except PeerFailure:
                # a frozen rank would keep the survivors from agreeing: give up after the deadline
                lost = self.t.recover(timeout=self.job.rank_timeout)
                if self.t.world_rank(0) != 0 or 0 in lost:
                    print(f"fluid-mpi: rank {self.t.world_rank()}: slice 0 / coordinator lost; stopping",
                          file=sys.stderr, flush=True)
                    return EXIT_FAILED
                if self.job.family == "static":
                    hdr[:] = 0
                    continue  # the coordinator's STOP follows on the shrunk communicator

