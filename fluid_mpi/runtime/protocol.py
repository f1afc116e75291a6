"""Message layout shared by the coordinator and the workers (plain numpy, no MPI).

Work (coordinator -> worker): header ``[cmd, batch, n, arg]`` + payload uint8 images ``(n, 28, 28)``.
Reply (worker -> coordinator): header ``[kind, batch, n, world_rank]`` + payload float32 ``(n, D)``
(D = hidden features in HA, 10 logits in HT).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .faults import FaultPlan

CMD_STOP, CMD_FEATURES, CMD_LOGITS, CMD_RUN = 0, 1, 2, 3
IMAGE = 28 * 28


def header(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


@dataclass
class Job:
    """Everything a run needs to know, identical on every rank (they all parse the same options)."""

    family: str
    mode: str  # "ha" | "ht" for fluid; "sliced" for static/dynamic
    images: np.ndarray  # uint8 (N, 28, 28): the inputs still to answer (coordinator only)
    labels: np.ndarray
    indices: np.ndarray  # global input index of each row
    batch_size: int = 64
    combine: str = "head"
    width: int | None = None  # dynamic only
    rank_timeout: float = 10.0
    credit: int = 2  # batches a worker may hold (one computing, one queued)
    faults: FaultPlan = field(default_factory=FaultPlan)
    stamp_dir: str = field(default_factory=tempfile.gettempdir)

    def batch_rows(self, batch: int) -> slice:
        return slice(batch * self.batch_size, (batch + 1) * self.batch_size)

    @property
    def n_batches(self) -> int:
        return -(-len(self.indices) // self.batch_size)


def _stamp_path(stamp_dir: str, world_rank: int) -> Path:
    ns = "".join(c if c.isalnum() else "_" for c in os.environ.get("PMIX_NAMESPACE", "local"))
    return Path(stamp_dir) / f"fluid-mpi-death-{ns}-{world_rank}.json"


def stamp_death(stamp_dir: str, world_rank: int, after_batch: int, how: str) -> None:
    """The victim of an injected fault notes when it dies, so the coordinator can report how long
    detection took (possible when both see the same file system, as on one host)."""
    try:
        _stamp_path(stamp_dir, world_rank).write_text(
            json.dumps({"rank": world_rank, "t": time.time(), "after_batch": after_batch, "how": how}))
    except OSError:
        pass


def read_death(stamp_dir: str, world_rank: int) -> dict | None:
    """The victim's death note, removed once read; None when there is none (a real failure)."""
    path = _stamp_path(stamp_dir, world_rank)
    try:
        note = json.loads(path.read_text())
        path.unlink()
        return note
    except (OSError, ValueError):
        return None


def failure_record(world_rank: int, stamp_dir: str, t_detect: float, last_contact: float | None,
                   after_batch: int | None, run_t0: float | None = None) -> dict:
    """One entry of the summary's ``failures`` list. ``at_s``: when it was detected, in seconds since
    the run started (``run_t0`` is a ``perf_counter`` reading), to line up with the timeline."""
    note = read_death(stamp_dir, world_rank)
    if note:
        rec = {"rank": world_rank, "after_batch": note["after_batch"], "how": note["how"],
               "detected_ms": round(1000 * (t_detect - note["t"]), 1), "detected_from": "death stamp"}
    else:
        since = None if last_contact is None else round(1000 * (t_detect - last_contact), 1)
        rec = {"rank": world_rank, "after_batch": after_batch, "how": "unknown",
               "detected_ms": since, "detected_from": "last contact"}
    if run_t0 is not None:
        rec["at_s"] = round(time.perf_counter() - run_t0 - (time.time() - t_detect), 4)
    return rec
