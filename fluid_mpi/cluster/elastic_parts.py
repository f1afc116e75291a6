"""What the elastic driver (elastic.py) works with: the protocols of its real or fake launcher, job and
outputs, its clock, its settings with the reason for every default, and the words of its records (how
an attempt ended, what a failure was)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Protocol, Sequence

from ..runtime.events import FaultKind


class EndReason(str, Enum):
    """How one attempt ended (the summary's ``attempts[].reason``), as torchrun's agent names a run's
    result. A ``str`` enum: written to JSON as its value."""

    EXITED = "exited"  # mpirun ended by itself
    DRAINED = "drained"  # stopped at a safe point (SIGUSR2) so that a returning host can rejoin
    STALLED = "stalled"  # no answer and no event for --stall-timeout: killed
    UNREACHABLE = "unreachable"  # one of its hosts missed Settings.probe_misses probes in a row: killed
    KILLED_AFTER_STOP = "killed after stop"  # infer wrote its stop event, mpirun lingered past the grace
    INTERRUPTED = "interrupted"  # the launcher was asked to stop (SIGINT/SIGTERM)

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


@dataclass
class Failure:
    """One lost device (seen from outside) or one in-job failure (from infer's events)."""

    host: str
    fault: FaultKind
    detected_ms: float | None  # from the last answer before it (outside) or infer's own figure
    source: str = "launcher"  # launcher | infer | infer+launcher
    wall_detected: float = field(default_factory=time.time)
    next_answer_ms: float | None = None  # the fault -> the first answer after it
    fault_at: float | None = None  # monotonic estimate of the fault: infer's figure, else the last answer

    def record(self) -> dict:
        """The summary entry."""
        return {"host": self.host, "fault": self.fault, "detected_ms": ms(self.detected_ms),
                "next_answer_ms": ms(self.next_answer_ms), "seen_by": self.source,
                "detected_at": round(self.wall_detected, 3)}


def ms(value: float | None) -> float | None:
    """A duration in ms as the summary writes it (0.1 ms)."""
    return None if value is None else round(value, 1)


@dataclass
class AttemptEnd:
    """How one attempt ended: infer's code (from its ``stop`` event) or mpirun's, and why."""

    code: int | None  # None: killed by the driver without a stop event
    stop: dict | None  # infer's stop event, if any
    reason: EndReason
    returned: list[str] = field(default_factory=list)  # lost hosts that answer again (rejoin)


class Job(Protocol):
    """One running mpirun."""

    def poll(self) -> int | None: ...  # exit code once it ended
    def drain(self) -> None: ...  # ask infer to stop at a safe point (exit 5)
    def kill(self) -> None: ...  # end mpirun's whole process group now


class Launcher(Protocol):
    """Starts mpirun on a set of hosts and cleans hosts up."""

    def start(self, hosts: Sequence[str], attempt: int) -> Job: ...
    def cleanup(self, hosts: Sequence[str]) -> None: ...  # kill this run's processes on those hosts
    # (called between attempts, and on a lost host as soon as it answers again)
    def prepare(self, hosts: Sequence[str]) -> None: ...  # get hosts ready to start ranks fast
    # (warm processes, idempotent, does not wait); called before each attempt and for a returning host
    def ready(self, host: str) -> bool: ...  # the host's preparation is done
    def responsive(self, host: str) -> bool: ...  # its processes run (a frozen host may still answer a
    # probe where a new process escapes the freeze, as on the virtual cluster); asked of silent hosts only


class Outputs(Protocol):
    """The files the ranks write: events (JSON lines) and predictions."""

    def new_events(self) -> list[dict]: ...  # events appended since the last call
    def progress(self) -> int: ...  # grows whenever an answer is written (file size)
    def answered(self) -> int: ...  # distinct input indices answered so far


@dataclass
class Clock:
    """Time as the driver sees it: a monotonic ``now`` and a ``sleep``."""

    now: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


@dataclass
class Settings:
    """Knobs of the driver, with the reason for every default."""

    np: int
    max_restarts: int = 3
    # hosts are probed once a second: the goals are 3 s to the next answer and 5 s to rejoin; a probe
    # costs ~10 ms (agent) to ~100 ms (ssh handshake)
    probe_every: float = 1.0
    # lost hosts are probed more often: a returning device waits for the next probe to be noticed, and
    # that wait is part of its rejoin (goal 5 s, of which its torch import takes 2-3.3 s); a probe of a
    # host that is still down fails at once on the virtual cluster, within PROBE_TIMEOUT_S over ssh
    lost_probe_every: float = 0.25
    # after infer's `stop` event, mpirun normally exits within ~1 s (ranks os._exit, PRRTE tears its
    # daemons down over TCP); after a survived death it may never exit (issue 9), so 3 s then kill
    stop_grace: float = 3.0
    # no answer and no event for this long: probe the hosts from outside. A pulled cable otherwise hangs
    # the job for ~8 min (PRRTE's keepalive); infer's own --rank-timeout deadline should fire first
    stall_timeout: float = 30.0
    # until infer's start event, an attempt is starting, not stalled: ranks import torch and run MPI_Init
    # (about 3 s on a quiet 2-core machine, 15-20 s for eight ranks sharing it, more on cold Pi 3s)
    start_timeout: float = 60.0
    # a drain (SIGUSR2) finishes the in-flight batches: a few batch times; 10 s then kill and relaunch
    drain_timeout: float = 10.0
    # an attempt's host missing this many probes in a row is lost: one slow ssh handshake on a busy Pi
    # must not end a healthy run, two in a row (1 s apart) mean it is gone (a pulled cable)
    probe_misses: int = 2
    # the loop's cadence: fine enough to time answers to 0.1 s, one stat() per tick
    tick: float = 0.1
    # a returning host gets this long to get ready (its warm process imports torch: ~2.5 s on a quiet
    # x86 core, ~15 s on a Pi 3) while the others go on answering; then the drain goes ahead anyway and
    # its rank starts cold
    ready_wait: float = 30.0


@dataclass
class AttemptWatch:
    """What the driver follows during one attempt."""

    hosts: list[str]
    seen: float  # last sign of life: an answer or an event
    next_probe: float
    next_lost_probe: float = 0.0
    stop: dict | None = None  # infer's stop event
    stop_at: float | None = None
    drain_at: float | None = None
    running: bool = False  # infer has started (its SIGUSR2 handler is in place): a drain is safe
    back: list[str] = field(default_factory=list)  # lost hosts answering again, for which it drains
    exit_code: int | None = None  # mpirun's, once it ended
    unreachable: bool = False  # one of its hosts missed Settings.probe_misses probes in a row


def end_code(stop: dict | None, mpirun_code: int | None) -> int | None:
    """infer's exit code is in its stop event; without one, mpirun's 0 means nothing (a lost daemon
    ends mpirun with 0)."""
    if stop is not None and stop.get("exit_code") is not None:
        return int(stop["exit_code"])
    return None if mpirun_code in (0, None) else mpirun_code
