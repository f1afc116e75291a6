"""``fluid-mpi infer``: one MPI rank per device, each holding one sub-network; rank 0 coordinates and
computes its own part. This module holds the start-up checks and wires each rank to its role
(``roles.py``); the options and their defaults are in ``options.py``."""
from __future__ import annotations

import logging
import signal
import time
import tempfile
from pathlib import Path

import numpy as np

from ..errors import ExitCode, FluidError, LaunchError
from . import exits
from .arrivals import parse_rate
from .liveness import Liveness
from .options import MODES, InferOptions
from .protocol import RunSpec

logger = logging.getLogger("fluid_mpi.runtime")

FT_HINT = ("fault tolerance is OFF: a rank's death will end the whole job. Turn it on with "
           "`mpirun --with-ft ulfm`, or export OMPI_MCA_mpi_ft_enable=1 PRTE_MCA_state_base_recoverable=1 "
           "PRTE_MCA_state_base_notify_errors=1 (scripts/setup.sh writes them into the venv's MCA files)")


def plan_layout(family: str, parts: int, size: int, width: int | None) -> tuple[int | None, str]:
    """Check -np against the checkpoint; returns (width, description of what runs where)."""
    if family == "fluid":
        if size > parts:
            raise LaunchError(f"-np {size} but the checkpoint has {parts} groups: use -np {parts} or fewer")
        where = ", ".join(f"rank {r}: group {r}" for r in range(size))
        return None, where + ("" if size == parts else f" (subset of {parts} groups)")
    if family == "static":
        if size != parts:
            raise LaunchError(f"-np {size} but this static checkpoint is split into {parts} slices: "
                              f"use -np {parts}")
        return parts, ", ".join(f"rank {r}: slice {r}" for r in range(size))
    width = width or min(size, parts)
    if not 1 <= width <= parts:
        raise LaunchError(f"--width {width} outside 1..{parts} for this dynamic checkpoint")
    if not width <= size <= parts:
        raise LaunchError(f"-np {size} does not fit dynamic width {width} of K={parts}: use -np {width}"
                          f"..{parts} (or --width)")
    where = ", ".join(f"rank {r}: slice {r}" if r < width else f"rank {r}: spare" for r in range(size))
    return width, where


def run_infer(opts: InferOptions) -> tuple[int, bool]:
    """Run on this rank; returns the exit code and whether to finalize MPI normally (only without
    fault tolerance: with ULFM the process ends with os._exit, see exits.planned_exit)."""
    from .mpi_transport import MpiTransport, ft_enabled  # starts MPI: keep it out of --help

    import faulthandler

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints where a rank is stuck
    t = MpiTransport()
    code = _run(t, opts, ft_enabled())
    # finalize only a single-process run or one without ULFM; decided on the size at start: a run shrunk
    # to one rank after a failure must not finalize (MPI_NOTES trap 3: MPI_Finalize hangs after a failure,
    # which kept mpirun from ever exiting across hosts)
    return code, t.world_size == 1 or not ft_enabled()


class Drain:
    """SIGUSR2 (mpirun forwards it to every rank; ``fluid-mpi launch`` sends it when a device comes back)
    asks the coordinator to stop at the next safe point. Installed on every rank, because SIGUSR2's
    default action would kill a worker."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGUSR2, self._set)

    def _set(self, *_) -> None:
        self.requested = True

    def __call__(self) -> bool:
        return self.requested


def _start(t, opts: InferOptions):
    """Load this rank's part and check the options; every rank learns every rank's error, so all stop
    together (no rank left waiting). Returns (part, meta, width, where, hosts) or an exit code."""
    import torch

    from .memory import tune_allocator

    torch.set_num_threads(1)
    tune_allocator()
    part = meta = error = width = where = None
    try:
        from ..model.checkpoint import load_meta, load_part

        meta = load_meta(opts.checkpoint)
        width, where = plan_layout(meta["family"], meta["parts"], t.size, opts.width)
        if meta["family"] == "fluid" and opts.mode not in MODES:
            raise LaunchError(f"--mode must be one of {', '.join(MODES)}, not {opts.mode}")
        plan = opts.fault_plan()
        beyond = [r for r in plan.ranks if r >= t.size]
        if beyond:
            raise LaunchError(f"--kill-rank {beyond[0]}: there are only ranks 0..{t.size - 1}")
        parse_rate(opts.rate)  # a bad --rate is every rank's error, before any work
        if opts.resume and not opts.predictions:
            raise LaunchError("--resume needs --predictions (the file that records what was answered)")
        part, _ = load_part(opts.checkpoint, t.rank)
        _warm_up(part)
    except FluidError as exc:
        error = str(exc)
    hosts = t.host_info(error)
    errors = [(r, e) for r, (_, _, e) in enumerate(hosts) if e]
    if errors:
        if t.rank == 0:
            first = errors[0][1] if len({e for _, e in errors}) == 1 else \
                "; ".join(f"rank {r}: {e}" for r, e in errors)
            logger.error(f"fluid-mpi: error: {first}")
        return ExitCode.BAD_INPUT
    return part, meta, width, where, [(h, p) for h, p, _ in hosts]


def _run(t, opts: InferOptions, ft: bool) -> int:
    from . import roles

    if t.size > 1:
        exits.install_unplanned_exit_guard()
    drain = Drain()
    started_at = time.time()
    started = _start(t, opts)
    if isinstance(started, int):
        return started
    part, meta, width, where, hosts = started
    if t.rank == 0 and t.size > 1 and not ft:
        logger.warning(f"fluid-mpi: warning: {FT_HINT}")
    if t.rank == 0 and not opts.quiet:
        print(f"fluid-mpi: {meta['family']} K={meta['parts']} on {t.size} rank(s): {where}", flush=True)
    stamp_dir = str(Path(opts.summary).resolve().parent) if opts.summary else tempfile.gettempdir()
    job = RunSpec(family=meta["family"], mode=opts.mode if meta["family"] == "fluid" else "sliced",
              images=np.zeros((0, *part.spec.image_shape), np.uint8), labels=np.zeros(0, np.int64), indices=np.zeros(0, np.int64),
              batch_size=opts.batch_size, rank_timeout=opts.rank_timeout, faults=opts.fault_plan(),
              stamp_dir=stamp_dir, combine=opts.combine, width=width, ha_deadline_ms=opts.ha_deadline_ms)
    ctx = roles.Context(t, part, meta, opts, job, Liveness(hosts), drain, started_at)
    return roles.coordinate(ctx) if t.rank == 0 else roles.serve(ctx)


def _warm_up(part) -> None:
    """One forward on a blank batch, so torch's first-call set-up is not charged to the first input."""
    import torch

    with torch.inference_mode():
        x = torch.zeros(1, part.spec.channels, part.spec.height, part.spec.width)
        if hasattr(part, "trunk"):
            part.head(part.trunk(x))
        else:
            part.stage(0, x)
