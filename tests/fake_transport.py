"""An in-process stand-in for MpiTransport: the coordinator's logic runs against it without MPI.
Workers are FluidParts computed when a batch is sent; a worker can be made to 'die' after N batches."""
from __future__ import annotations

from collections import deque

import numpy as np
import torch

from fluid_mpi.model.data import to_tensor_batch
from fluid_mpi.errors import PeerFailure
from fluid_mpi.runtime.protocol import CMD_FEATURES, CMD_STOP


class FakeHandle:
    def __init__(self, world):
        self.world, self.header, self.payload = world, None, None


class FakeTransport:
    def __init__(self, parts: dict, die_after: dict | None = None):
        self.parts, self.members = parts, sorted(parts)
        self.die_after = die_after or {}
        self.answered = {w: 0 for w in parts}
        self.dead: set[int] = set()
        self.replies = {w: deque() for w in parts}
        self.sent_batches: list[tuple[int, int]] = []
        self.stops: set[int] = set()

    rank = 0

    @property
    def size(self):
        return len(self.members)

    def world_rank(self, r=None):
        return self.members[0 if r is None else r]

    def send(self, dest, header, payload):
        w = self.members[dest]
        cmd, batch, n, _ = (int(v) for v in header)
        if cmd == CMD_STOP:
            self.stops.add(w)
            return
        self.sent_batches.append((w, batch))
        if self.answered[w] >= self.die_after.get(w, 10**9):
            self.dead.add(w)  # dies holding this batch
            return
        x = to_tensor_batch(payload.reshape(n, 28, 28))
        with torch.no_grad():
            out = self.parts[w].features(x) if cmd == CMD_FEATURES else self.parts[w].logits(x)
        self.replies[w].append((np.array([cmd, batch, n, w]), out.numpy().reshape(-1)))
        self.answered[w] += 1

    def recv_start(self, source, max_items, dtype=np.float32, row=1):
        return FakeHandle(self.members[source])

    def ready(self, handle):
        if handle.world in self.dead:
            raise PeerFailure("fake death", (handle.world,))
        if self.replies[handle.world]:
            handle.header, handle.payload = self.replies[handle.world].popleft()
            return True
        return False

    def pause(self):
        pass

    def flush_sends(self, timeout=0):
        return True

    def recover(self):
        lost = sorted(self.dead & set(self.members))
        self.members = [w for w in self.members if w not in self.dead]
        for w in self.members:
            self.replies[w].clear()  # messages in flight across a shrink are lost
        return lost

    def kill(self, pid):
        raise AssertionError("no frozen ranks in these tests")
