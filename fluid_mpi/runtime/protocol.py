"""Message layout shared by the coordinator and the workers, and the :class:`RunSpec` every rank runs
(plain numpy, no MPI).

Work (coordinator -> worker): header ``[cmd, batch, n, arg]`` + payload uint8 images ``(n, *image_shape)``.
Reply (worker -> coordinator): header ``[kind, batch, n, D]`` + payload float32 ``(n, D)``
(D = hidden features in HA, one logit per class in HT). Sizes come from the checkpoint's input spec. The transport appends the payload's CRC-32.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ExitCode
from .faults import FaultPlan

CMD_STOP, CMD_FEATURES, CMD_LOGITS, CMD_RUN, CMD_PING = 0, 1, 2, 3, 4  # PING: a keep-alive, no work


def header(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


@dataclass
class RunSpec:
    """Everything a run needs to know, identical on every rank (they all parse the same options)."""

    family: str
    mode: str  # "ha" | "ht" for fluid; "sliced" for static/dynamic
    batch_size: int
    rank_timeout: float
    faults: FaultPlan
    stamp_dir: str
    combine: str = "head"
    width: int | None = None  # dynamic only
    ha_deadline_ms: float | None = None  # Fluid HA: answer with the groups in by then (runtime/deadline.py)
    # in-process inputs (tests): the coordinator replays these when it is given no InputStream
    images: np.ndarray | None = None
    labels: np.ndarray | None = None
    indices: np.ndarray | None = None


# The status word of the summary and the `stop` event, and its exit code
STATUS_EXIT = {"ok": ExitCode.OK, "failed": ExitCode.STOPPED, "silent": ExitCode.SILENT, "drained": ExitCode.DRAINED}
# A STOP message is 40 bytes: a worker that cannot take it within 2 s is gone, and mpirun ends it.
STOP_FLUSH_S = 2.0


@dataclass
class Outcome:
    """How a coordinator's loop ended (``status``: ok, failed, silent or drained)."""

    elapsed_s: float
    ranks_end: int
    status: str = "ok"
    message: str = ""
    width_end: int | None = None
    silent_hosts: tuple[str, ...] = ()

    @property
    def exit_code(self) -> int:
        return STATUS_EXIT[self.status]
