"""An in-process fake of the :class:`~fluid_mpi.runtime.transport.Transport` protocol, driven by a fake
clock, so the coordinator, worker and sliced loops are unit-tested without MPI.

The "network": a message is deliverable only ``delay`` polls after it was sent (a poll is one ``ready``,
one step of ``wait`` or of a collective), never inside ``send``; ``delay`` may be a function of
``(world, batch)``, which reorders replies. Every poll advances the fake clock by ``tick`` seconds.
Fates of a peer (world rank ``w``):

- ``die(w)``: its process is gone; the next ``ready`` on a message from it, a ``send`` to it, or any
  collective raises PeerFailure, and ``shrink`` removes it (``die_after[w] = n``: dies holding the batch after ``n`` answers);
- ``freeze(w)``: it never answers again and takes no part in a shrink. On this host its state is 'stopped',
  so the liveness policy kills it (a death). On a far host (``far=``) its state is not observable and the
  kill ``"fails"`` (unreachable) or is ``"ignored"`` (delivered, but no death is ever reported)
  (``freeze_after[w] = n``, ``kill_mode[w]``).

Coordinator side: ``parts`` (world -> FluidPart) are simulated Fluid workers computing what they are sent;
``slices`` (world -> SlicePart) the peers of a sliced run, computing their share of every collective.
Worker side: ``push(0, header, payload)`` scripts the coordinator's messages and ``bcasts`` its broadcasts
(a callable in ``bcasts`` is run on the fake when reached, e.g. ``lambda t: t.die(0)``).
``when(cond, action)`` runs ``action(t)`` at the first poll where ``cond(t)``. ``late = True`` keeps replies
sent before a shrink and delivers them right after it (stale replies, counted in ``stale``);
``shrink_fails = True`` makes ``shrink`` raise RecoveryFailed.
"""
from __future__ import annotations

from collections import Counter, deque

import numpy as np
import torch

from fluid_mpi.errors import PeerFailure, RecoveryFailed
from fluid_mpi.model.data import to_tensor_batch
from fluid_mpi.model.partition import narrow
from fluid_mpi.runtime import liveness as liveness_mod
from fluid_mpi.runtime.liveness import Liveness
from fluid_mpi.runtime.protocol import CMD_FEATURES, CMD_RUN, CMD_STOP, header

PID0 = 1000  # fake pid of world rank w: PID0 + w
NEVER = 10**9


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


class FakeHandle:
    def __init__(self, world: int, epoch: int):
        self.world, self.epoch = world, epoch
        self.header = self.payload = None


class FakeTransport:
    def __init__(self, world_size: int, me: int = 0, parts: dict | None = None, slices: dict | None = None,
                 delay=1, tick: float = 0.01, far=(), clock: FakeClock | None = None):
        self.members = list(range(world_size))
        self.me, self.parts, self.slices = me, parts or {}, slices or {}
        self.delay = delay if callable(delay) else (lambda w, b: delay)
        self.tick, self.clock = tick, clock or FakeClock()
        self.hosts = [(f"far{w}" if w in far else "fake", PID0 + w) for w in range(world_size)]
        self.proc = {w: "R" for w in range(world_size)}  # /proc state letter; "" = gone
        self.dead, self.frozen = set(), set()  # world ranks
        self.kill_mode: dict[int, str] = {}  # "dies" (default), "fails", "ignored"
        self.die_after, self.freeze_after = {}, {}  # world -> answers before it dies / freezes
        self.inbox: dict[int, list] = {w: [] for w in range(world_size)}  # [due, seq, header, payload, epoch]
        self.bcasts: deque = deque()
        self.polls = self.epoch = self.seq = self.stale = self.shrinks = self.revokes = 0
        self.revoked = self.late = self.shrink_fails = False
        self.triggers: list = []
        self.sent: list[tuple[int, list[int], np.ndarray]] = []  # (world, header, payload) of every send
        self.stops, self.kills = {}, []  # world -> code of the STOP it was sent; world ranks killed
        self.delivered: list[tuple[int, int]] = []  # (world, batch) of every message received, in order
        self.answers: Counter = Counter()
        self.collectives: list[tuple[str, np.ndarray]] = []
        self._width, self._shared, self._stage = None, None, 0

    @property
    def rank(self) -> int:
        return self.members.index(self.me)

    @property
    def size(self) -> int:
        return len(self.members)

    def world_rank(self, r: int | None = None) -> int:
        return self.members[self.rank if r is None else r]

    def die(self, w: int, revoke: bool = False) -> None:
        """``revoke``: another rank noticed and revoked the communicator (wakes this one)."""
        self.dead.add(w)
        self.frozen.discard(w)
        self.proc[w] = ""
        self.revoked |= revoke

    def freeze(self, w: int, kill: str | None = None) -> None:
        self.frozen.add(w)
        self.proc[w] = "T"
        self.kill_mode[w] = kill or self.kill_mode.get(w, "dies")

    def when(self, cond, action) -> None:
        self.triggers.append((cond, action))

    def push(self, src: int, hdr, payload: np.ndarray, delay: int = 1, epoch: int | None = None) -> None:
        """A message from world rank ``src``, deliverable after ``delay`` more polls (``epoch`` None: a
        scripted message that any later communicator sees)."""
        self.seq += 1
        self.inbox[src].append([self.polls + delay, self.seq, np.asarray(hdr, np.int64), payload, epoch])

    def process_state(self, pid: int) -> str:
        return self.proc.get(pid - PID0, "")

    def local_kill(self, pid: int) -> None:
        self._kill(pid - PID0)

    def remote_kill(self, host: str, argv: list[str]) -> bool:
        return self._kill(int(argv[-1]) - PID0)

    def _kill(self, w: int) -> bool:
        self.kills.append(w)
        mode = self.kill_mode.get(w, "dies")
        if mode == "dies":
            self.die(w)
        return mode != "fails"

    def liveness(self, monkeypatch) -> Liveness:
        """The real Liveness policy over this fake's processes, hosts and clock."""
        monkeypatch.setattr(liveness_mod, "process_state", self.process_state)
        return Liveness(self.hosts, here="fake", remote=self.remote_kill, local_kill=self.local_kill,
                        clock=self.clock)

    def _poll(self) -> None:
        self.polls += 1
        self.clock.advance(self.tick)
        for trig in list(self.triggers):
            if trig[0](self):
                self.triggers.remove(trig)
                trig[1](self)

    def _check(self, worlds) -> None:
        if self.revoked:
            raise PeerFailure("fake: communicator revoked")
        gone = tuple(w for w in worlds if w in self.dead)
        if gone:
            raise PeerFailure(f"fake: rank(s) {gone} failed", gone)

    def send(self, dest: int, hdr: np.ndarray, payload: np.ndarray) -> None:
        w, h = self.members[dest], [int(v) for v in hdr]
        self._check((w,))  # like ULFM: a send to a peer known to have failed raises
        self.sent.append((w, h, np.array(payload, copy=True)))
        if h[0] == CMD_STOP:
            self.stops[w] = h[3]
        elif w in self.parts and w not in self.dead and w not in self.frozen:
            self._work(w, h, payload)

    def _work(self, w: int, h: list[int], payload: np.ndarray) -> None:
        if self.answers[w] >= self.die_after.get(w, NEVER):
            return self.die(w)  # dies holding this batch
        if self.answers[w] >= self.freeze_after.get(w, NEVER):
            return self.freeze(w)
        cmd, batch, n = h[:3]
        x = to_tensor_batch(np.asarray(payload).reshape(n, 28, 28))
        with torch.no_grad():
            out = self.parts[w].features(x) if cmd == CMD_FEATURES else self.parts[w].logits(x)
        self.answers[w] += 1
        self.push(w, header(cmd, batch, n, w), out.numpy().reshape(-1), self.delay(w, batch), self.epoch)

    def recv_start(self, source: int, max_items: int, dtype=np.float32, row: int = 1) -> FakeHandle:
        self._check(())
        return FakeHandle(self.members[source], self.epoch)

    def ready(self, h: FakeHandle) -> bool:
        self._poll()
        if h.epoch != self.epoch:
            raise PeerFailure("fake: receive posted on a revoked communicator")
        self._check((h.world,))
        ok = [m for m in self.inbox[h.world] if m[0] <= self.polls and (self.late or m[4] in (None, h.epoch))]
        if not ok:
            return False
        m = min(ok, key=lambda m: (m[0], m[1]))
        self.inbox[h.world].remove(m)
        self.stale += m[4] is not None and m[4] != h.epoch
        h.header, h.payload = m[2], m[3]
        self.delivered.append((h.world, int(m[2][1])))
        return True

    def wait(self, h: FakeHandle, timeout: float) -> bool:
        end = self.clock() + timeout
        while not self.ready(h):
            if self.clock() >= end:
                return False
        return True

    def flush_sends(self, timeout: float) -> bool:
        return True

    def bcast(self, buf: np.ndarray, timeout: float, on_stall=None) -> np.ndarray:
        return self._collective("bcast", buf, timeout, on_stall)

    def allgather(self, mine: np.ndarray, timeout: float, on_stall=None) -> np.ndarray:
        return self._collective("allgather", mine, timeout, on_stall)

    def gather(self, mine: np.ndarray, timeout: float, on_stall=None) -> np.ndarray | None:
        return self._collective("gather", mine, timeout, on_stall)

    def _collective(self, kind: str, buf: np.ndarray, timeout: float, on_stall):
        scripted = kind == "bcast" and self.rank != 0
        end = self.clock() + timeout
        while True:
            self._poll()
            while scripted and self.bcasts and callable(self.bcasts[0]):
                self.bcasts.popleft()(self)
            self._check(self.members)
            if not (self.frozen & set(self.members)) and not (scripted and not self.bcasts):
                break
            if self.clock() >= end:
                if on_stall is None or not on_stall():
                    raise TimeoutError("fake: collective did not complete in time")
                end = self.clock() + timeout
        if kind == "bcast":
            if scripted:
                np.copyto(buf, np.asarray(self.bcasts.popleft()).reshape(buf.shape))
            if buf.dtype == np.int64 and int(buf[0]) == CMD_RUN:
                self._width = int(buf[3])
            elif buf.dtype == np.uint8:
                self._shared, self._stage = to_tensor_batch(buf), 0
            self.collectives.append((kind, buf.copy()))
            return buf
        mine = np.asarray(buf, np.float32)
        full = np.stack([mine if w == self.me else self._peer(i, w, mine) for i, w in enumerate(self.members)])
        self.collectives.append((kind, full))
        if kind == "allgather":
            self._stage += 1
            self._shared = torch.from_numpy(np.concatenate(list(full[:self._width]), axis=1))
            return full
        return full if self.rank == 0 else None

    def _peer(self, pos: int, w: int, mine: np.ndarray) -> np.ndarray:
        """Peer ``w``'s contribution at the current stage (zeros when it is not simulated or inactive)."""
        if w not in self.slices or self._width is None or pos >= self._width or self._shared is None:
            return np.zeros_like(mine)
        with torch.no_grad():
            return narrow(self.slices[w], self._width).stage(self._stage, self._shared).numpy()

    def shrink(self, timeout: float) -> list[int]:
        self.shrinks += 1
        self.revoked = True
        if self.shrink_fails or (self.frozen & set(self.members)):
            self.clock.advance(timeout)
            raise RecoveryFailed(f"fake: the survivors could not agree within {timeout:g} s")
        lost = sorted(self.dead & set(self.members))
        self.members = [w for w in self.members if w not in self.dead]
        self.epoch += 1
        self.revoked = False
        for q in self.inbox.values():  # messages in flight on the old communicator are gone, or, when
            if not self.late:          # late, arrive right after the shrink, ahead of anything new
                q[:] = [m for m in q if m[4] is None]
            for m in q:
                if m[4] is not None:
                    m[0] = min(m[0], self.polls)
        return lost

    def revoke(self) -> None:
        self.revokes += 1
        self.revoked = True
