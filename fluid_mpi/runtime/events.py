"""``--events PATH``: an append-only JSON-lines log of what happened in a run, written as it happens.

One object per line, ``{"t": unix time, "event": NAME, ...}``, flushed and fsynced per line (events are
rare: a handful per run). The file is opened in append mode, so one log can span a take-over and the
relaunches of ``fluid-mpi launch``. The summary's ``failures`` and ``events`` are built from the same
records, never from stderr.

Events: ``start`` {coordinator, ranks, family, mode, hosts, inputs, images, todo, resumed,
expected_accuracy (Fluid: the checkpoint's HA and HT-mix test accuracy)}, ``failure`` {rank, host, fault, how, detected_ms, after_batch}, ``kill`` {rank, host,
pid, reason}, ``recovered`` {lost, ranks, recovery_ms}, ``head_switch`` {head, was}, ``width_switch``
{width, was}, ``takeover`` {coordinator, lost}, ``answering_again`` {after_failure_ms}, ``drain``,
``mode_switch`` {mode, was, backlog, arrival_rate, reason},
``stop`` {status, answered, images, exit_code, message, silent_hosts}.
"""
from __future__ import annotations

import json
import os
import time
from enum import Enum
from pathlib import Path
from typing import Callable

from .faults import read_death


class FaultKind(str, Enum):
    """What a ``failure`` record says happened to a device (infer's events, the launcher's summary).
    A ``str`` enum: it is written to JSON, and compared with what was read back, as its value."""

    PROCESS_EXIT = "process exit"  # the rank's process died; ULFM reported it (in-job)
    SILENT = "silent"  # held work past --rank-timeout or went unheard: killed out of band, or not killable
    LOST_DAEMON = "lost daemon"  # the launcher saw mpirun end and the host no longer answers (power-off)

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__

# Events that go into the summary's "events" list (failures have their own list; start/stop frame it).
SUMMARY_EVENTS = ("kill", "recovered", "head_switch", "width_switch", "takeover", "answering_again", "drain",
                  "mode_switch", "ha_skip", "ha_unskip")


class EventLog:
    """Records events in memory and, when a path is given, appends them to the file at once."""

    def __init__(self, path: str | os.PathLike | None, clock: Callable[[], float] = time.time,
                 tag: dict | None = None):
        """``tag``: fields written into every record after ``event`` (the launcher's ``"by": "launch"``)."""
        self.path, self.clock, self.tag = path, clock, dict(tag or {})
        self.records: list[dict] = []
        self._fh = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(path, "a", encoding="utf-8")

    def emit(self, event: str, **fields) -> dict:
        """Append one event; returns the record."""
        rec = {"t": round(self.clock(), 6), "event": event, **self.tag, **fields}
        self.records.append(rec)
        if self._fh is not None:
            self._fh.write(json.dumps(rec) + "\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())
        return rec

    def of(self, *kinds: str) -> list[dict]:
        return [r for r in self.records if r["event"] in kinds]

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def stopped_since(path: str | os.PathLike | None, t0: float) -> dict | None:
    """The ``stop`` event written to the event log at ``path`` after unix time ``t0``, or None: when there
    is one, the run this rank belongs to has already ended (its coordinator stopped, e.g. with a device
    silent, or done), so a rank cut off from it must not take over and answer again."""
    if path is None or not Path(path).exists():
        return None
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == "stop" and rec.get("t", 0) >= t0:
            return rec
    return None


def failure_fields(world_rank: int, host: str, stamp_dir: str, t_detect: float, last_contact: float | None,
                   after_batch: int | None, fault: FaultKind = FaultKind.PROCESS_EXIT) -> dict:
    """The fields of one ``failure`` event. ``detected_ms`` is measured from the victim's own death stamp
    (an injected fault, on a shared file system) or else from the last message the rank sent."""
    note = read_death(stamp_dir, world_rank)
    if note:
        return {"rank": world_rank, "host": host, "fault": fault, "how": note["how"],
                "after_batch": note["after_batch"], "detected_ms": round(1000 * (t_detect - note["t"]), 1),
                "detected_from": "death stamp"}
    since = None if last_contact is None else round(1000 * (t_detect - last_contact), 1)
    return {"rank": world_rank, "host": host, "fault": fault, "how": "unknown", "after_batch": after_batch,
            "detected_ms": since, "detected_from": "last contact"}


class FailureTracker:
    """A coordinator's record of failures: one ``failure`` event per lost rank, then one
    ``answering_again`` event at the next answer, with the time from the fault to it."""

    def __init__(self, events: EventLog, hosts: dict[int, tuple[str, int]], stamp_dir: str, run_t0: float):
        self.events, self.hosts, self.stamp_dir, self.run_t0 = events, hosts, stamp_dir, run_t0
        self.fault_at: float | None = None  # unix time of the earliest fault not yet followed by an answer

    def lost(self, ranks: list[int], t_detect: float, last_contact: dict[int, float], after_batch: int | None,
             fault: FaultKind = FaultKind.PROCESS_EXIT, killed: dict | set = ()) -> None:
        """``killed``: ranks the liveness policy killed out of band (their fault, seen from outside, is
        that they went silent)."""
        for w in ranks:
            fields = failure_fields(w, self.hosts.get(w, ("?", 0))[0], self.stamp_dir, t_detect,
                                    last_contact.get(w), after_batch, FaultKind.SILENT if w in killed else fault)
            fields["at_s"] = round(t_detect - self.run_t0, 4)
            self.events.emit("failure", **fields)
            died = t_detect - (fields["detected_ms"] or 0) / 1000 if fields["detected_from"] == "death stamp" \
                else t_detect
            self.fault_at = died if self.fault_at is None else min(self.fault_at, died)

    def answered(self) -> None:
        """Call after every recorded batch."""
        if self.fault_at is not None:
            self.events.emit("answering_again", after_failure_ms=round(1000 * (time.time() - self.fault_at), 1))
            self.fault_at = None
