"""The options of ``fluid-mpi infer`` and the one place for their defaults (stdlib only, so the CLI can
read them without importing numpy, torch or MPI)."""
from __future__ import annotations

from dataclasses import dataclass, field

from . import faults

MODES = ("ha", "ht", "auto")
COMBINES = ("head", "avg")


@dataclass
class InferOptions:
    """Every option of ``fluid-mpi infer``; the CLI takes its defaults from here."""

    checkpoint: str
    mode: str = "ha"
    data_dir: str | None = None
    input: str | None = None  # a folder of images, a .npy of the model's input shape, or "-" for paths on stdin
    rate: str | None = None  # replay the inputs as a Poisson stream: "R" images/s, or steps "R1@S1,R2@S2,R3"
    seed: int = 0
    latency_ms: float | None = None  # --mode auto: the latency target per input
    ha_deadline_ms: float | None = None  # Fluid HA (and auto's HA): answer with the groups in by then
    batch_size: int = 64
    limit: int | None = None
    repeat: int = 1  # present the inputs this many times, as distinct inputs (steady-state benchmarks)
    summary: str | None = None
    predictions: str | None = None
    events: str | None = None
    resume: bool = False
    with_logits: bool = False
    width: int | None = None
    combine: str = "head"
    # a batch of 64 takes milliseconds even on a Pi-class core: 10 s of silence is a frozen or lost device
    rank_timeout: float = 10.0
    kill_rank: tuple[str, ...] = field(default_factory=tuple)
    kill_after: int | None = None
    kill_how: str = "kill"
    quiet: bool = False

    def fault_plan(self) -> faults.FaultPlan:
        return faults.FaultPlan.parse(self.kill_rank, self.kill_how, self.kill_after)
