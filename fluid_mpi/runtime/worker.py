"""A worker rank's loop for Fluid runs: receive a batch, run its group, send features (HA) or logits
(HT) back, ask for the next by answering. Survives other workers' failures (the one recovery path) and
reports the coordinator's loss to the caller, who decides whether to take over.

Every wait has a deadline: each ``rank_timeout`` of silence the liveness policy is asked about the
coordinator (dead or frozen on this host: kill it, recover, take over); a coordinator silent for longer
than :func:`~fluid_mpi.runtime.liveness.coordinator_silence_limit` makes the worker stop (exit 3).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ExitCode, PeerFailure, RecoveryFailed
from .faults import FaultInjector
from .liveness import Liveness, coordinator_silence_limit
from .protocol import CMD_FEATURES, CMD_PING, CMD_STOP, RunSpec, header
from .scheduler import expected_share
from .transport import Transport, recover

logger = logging.getLogger("fluid_mpi.runtime")


@dataclass
class WorkerEnd:
    """How a worker's loop ended: told to stop (``code``), or the coordinator was lost (``lost``: every
    world rank lost so far; the caller may take over)."""

    code: int = 0
    coordinator_lost: bool = False
    lost: list[int] = field(default_factory=list)


def stop_worker(message: str) -> WorkerEnd:
    logger.error(f"fluid-mpi: {message}; stopping")
    return WorkerEnd(ExitCode.STOPPED)


def wait_for_coordinator(t: Transport, handle, job: RunSpec, liveness: Liveness) -> bool:
    """Wait for the coordinator's next message. False when it has been silent past the limit; raises
    PeerFailure when this host sees it dead or frozen (a frozen one is killed first, so ULFM agrees)."""
    coordinator = t.world_rank(0)
    silent = 0.0
    while not t.wait(handle, job.rank_timeout):
        silent += job.rank_timeout
        if liveness.lost(coordinator):
            liveness.kill(coordinator)
            raise PeerFailure("the coordinator's process is dead or frozen", (coordinator,))
        if silent >= coordinator_silence_limit(job.rank_timeout):
            return False
    return True


def serve_fluid(t: Transport, part, job: RunSpec, liveness: Liveness) -> WorkerEnd:
    """Serve until told to stop or the coordinator is lost."""
    injector = FaultInjector(job.faults, t.world_rank(), job.stamp_dir)
    coordinator = t.world_rank(0)
    lost_all: list[int] = []

    pixels, shape = part.spec.pixels, part.spec.image_shape  # the checkpoint's input: no size assumed

    def post():
        return t.recv_start(0, job.batch_size * pixels, np.uint8, pixels)

    handle = post()
    while True:
        try:
            if not wait_for_coordinator(t, handle, job, liveness):
                return stop_worker(f"rank {t.world_rank()}: the coordinator (rank {coordinator}) has been "
                                   f"silent for {coordinator_silence_limit(job.rank_timeout):g} s")
            cmd, batch, n, n_batches = (int(v) for v in handle.header[:4])
            if cmd == CMD_STOP:
                t.flush_sends(job.rank_timeout)
                return WorkerEnd(n_batches)  # the exit code travels in the last field
            if cmd == CMD_PING:  # the coordinator is idle, waiting for inputs to arrive
                handle = post()
                continue
            imgs = handle.payload[:n * pixels].reshape(n, *shape)  # no copy: post() gives the next its own buffer
            handle = post()  # the next batch may arrive while this one is computed
            with torch.inference_mode():
                x = part.spec.to_tensor(imgs)
                out = part.features(x) if cmd == CMD_FEATURES else part.logits(x)
            out = out.numpy()
            t.send(0, header(cmd, batch, n, out.shape[1]), out)  # [kind, batch, rows, items per row]
            injector.tick(expected_share(n_batches, t.size, job.mode))
        except PeerFailure:
            try:
                lost_all += recover(t, liveness, job.rank_timeout)
            except RecoveryFailed as exc:
                return stop_worker(f"rank {t.world_rank()}: {exc}")
            if coordinator in lost_all:
                return WorkerEnd(ExitCode.STOPPED, coordinator_lost=True, lost=lost_all)
            handle = post()
