"""A worker rank's loop for Fluid runs: receive a batch, run its group, send features (HA) or logits
(HT) back, ask for the next by answering. Survives other workers' failures (recover and go on) and
reports the coordinator's death to the caller, who decides whether to take over."""
from __future__ import annotations

import numpy as np
import torch

from ..model.data import to_tensor_batch
from ..errors import PeerFailure
from .faults import die
from .protocol import CMD_FEATURES, CMD_STOP, IMAGE, Job, header, stamp_death
from .scheduler import expected_share


def serve_fluid(transport, part, job: Job, peer_alive=None) -> tuple[str, object]:
    """Serve until told to stop. Returns ``("stop", exit_code)`` or ``("coordinator-lost", lost_ranks)``
    when world rank of the coordinator is among the lost (the caller may take over).

    ``peer_alive(world_rank) -> bool`` is a second opinion on the coordinator, asked every 2 s of
    silence: ULFM missed the coordinator's death in about 1 of 10 runs here, leaving workers waiting.
    """
    t, plan = transport, job.faults
    coordinator = t.world_rank(0)
    answered = 0
    def post():
        return t.recv_start(0, job.batch_size * IMAGE, np.uint8, IMAGE)

    handle = post()
    while True:
        try:
            while not t.wait(handle, timeout=2.0):
                if peer_alive is not None and not peer_alive(coordinator):
                    raise PeerFailure("the coordinator's process is gone", (coordinator,))
            cmd, batch, n, arg = (int(v) for v in handle.header[:4])
            if cmd == CMD_STOP:
                t.flush_sends(timeout=2.0)
                return "stop", arg
            imgs = handle.payload[:n * IMAGE].reshape(n, 28, 28).copy()
            handle = post()  # the next batch may arrive while this one is computed
            me = t.world_rank()
            # arg = the run's batch count, so the default --kill-after (halfway) is known here too
            if plan.should_die(me, answered, expected_share(arg, t.size, job.mode)):
                stamp_death(job.stamp_dir, me, answered, plan.how)
                die(plan.how)
            with torch.no_grad():
                x = to_tensor_batch(imgs)
                out = part.features(x) if cmd == CMD_FEATURES else part.logits(x)
            t.send(0, header(cmd, batch, n, me), out.numpy())
            answered += 1
        except PeerFailure:
            lost = t.recover(timeout=5.0)  # exits with a clear line if the survivors cannot agree
            if coordinator in lost:
                return "coordinator-lost", lost
            handle = post()
