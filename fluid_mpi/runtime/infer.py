"""``fluid-mpi infer``: one MPI rank per device, each holding one sub-network; rank 0 coordinates and
computes its own part. This module wires options, checks, roles and outputs together; the loops live in
``coordinator.py`` / ``worker.py`` (Fluid) and ``sliced.py`` (Static, Dynamic)."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import faults
from ..errors import FluidError, LaunchError
from .outputs import PredictionSink, answered_indices, human_summary, write_summary
from .protocol import Job, failure_record

FT_HINT = ("fault tolerance is OFF: a rank's death will end the whole job. Turn it on with "
           "`mpirun --with-ft ulfm`, or export OMPI_MCA_mpi_ft_enable=1 PRTE_MCA_state_base_recoverable=1 "
           "PRTE_MCA_state_base_notify_errors=1 (scripts/setup.sh writes them into the venv's MCA files)")


@dataclass
class InferOptions:
    checkpoint: str
    mode: str = "ha"
    data_dir: str | None = None
    batch_size: int = 64
    limit: int | None = None
    summary: str | None = None
    predictions: str | None = None
    with_logits: bool = False
    width: int | None = None
    combine: str = "head"
    rank_timeout: float = 10.0
    kill_rank: tuple[int, ...] = ()
    kill_after: int | None = None
    kill_how: str = "kill"
    quiet: bool = False


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
    fault tolerance: with ULFM the process ends with os._exit, see faults.planned_exit)."""
    from .mpi_transport import MpiTransport, ft_enabled  # starts MPI: keep it out of --help

    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints where a rank is stuck
    t = MpiTransport()
    return _run(t, opts), t.size == 1 or not ft_enabled()


def _run(t, opts: InferOptions) -> int:
    from .mpi_transport import ft_enabled

    if t.size > 1:
        faults.install_unplanned_exit_guard()
    import torch

    torch.set_num_threads(1)
    rank, size = t.rank, t.size
    part = meta = error = None
    try:
        from ..model.checkpoint import load_meta, load_part

        meta = load_meta(opts.checkpoint)
        width, where = plan_layout(meta["family"], meta["parts"], size, opts.width)
        if meta["family"] == "fluid" and opts.mode not in ("ha", "ht"):
            raise LaunchError(f"--mode must be ha or ht, not {opts.mode}")
        beyond = sorted(r for r in opts.kill_rank if r >= size)
        if beyond:
            raise LaunchError(f"--kill-rank {beyond[0]}: there are only ranks 0..{size - 1}")
        part, _ = load_part(opts.checkpoint, rank)
        _warm_up(part)
    except FluidError as exc:
        error = str(exc)
    # every rank learns every rank's error, so all of them stop together (no rank left waiting)
    hosts = t.host_info(error)
    errors = [(r, e) for r, (_, _, e) in enumerate(hosts) if e]
    if errors:
        if rank == 0:
            first = errors[0][1] if len({e for _, e in errors}) == 1 else \
                "; ".join(f"rank {r}: {e}" for r, e in errors)
            print(f"fluid-mpi: error: {first}", file=sys.stderr, flush=True)
        return 2
    if rank == 0 and size > 1 and not ft_enabled():
        print(f"fluid-mpi: warning: {FT_HINT}", file=sys.stderr, flush=True)
    if rank == 0 and not opts.quiet:
        print(f"fluid-mpi: {meta['family']} K={meta['parts']} on {size} rank(s): {where}", flush=True)
    hosts = [(h, p) for h, p, _ in hosts]
    stamp_dir = str(Path(opts.summary).resolve().parent) if opts.summary else None
    job_kw = dict(family=meta["family"], mode=opts.mode if meta["family"] == "fluid" else "sliced",
                  batch_size=opts.batch_size, combine=opts.combine, width=width,
                  rank_timeout=opts.rank_timeout,
                  faults=faults.FaultPlan(tuple(opts.kill_rank), opts.kill_after, opts.kill_how))
    if stamp_dir:
        job_kw["stamp_dir"] = stamp_dir
    if rank == 0:
        return _coordinate(t, part, meta, opts, job_kw, hosts, size)
    empty = Job(images=np.zeros((0, 28, 28), np.uint8), labels=np.zeros(0, np.int64),
                indices=np.zeros(0, np.int64), **job_kw)
    if meta["family"] != "fluid":
        from .sliced import SlicedRun

        return SlicedRun(t, part, empty, hosts=hosts).serve()
    return _serve_fluid(t, part, meta, opts, job_kw, hosts, empty)


def _warm_up(part) -> None:
    """One forward on a blank batch, so torch's first-call set-up is not charged to the first input."""
    import torch

    with torch.no_grad():
        x = torch.zeros(1, 1, 28, 28)
        if hasattr(part, "trunk"):
            part.head(part.trunk(x))
        else:
            part.stage(0, x)


def _load_inputs(opts: InferOptions, skip: set[int] | None = None):
    from ..model.data import load_split

    ds = load_split(opts.data_dir, "test").take(opts.limit)
    idx = np.arange(len(ds))
    if skip:
        idx = np.array([i for i in idx if i not in skip], dtype=np.int64)
    return ds, idx


def _coordinate(t, part, meta, opts, job_kw, hosts, size, takeover_from: list[int] | None = None,
                takeover_at: float = 0.0) -> int:
    try:
        skip = answered_indices(opts.predictions) if (takeover_from and opts.predictions) else set()
        ds, idx = _load_inputs(opts, skip)
    except FluidError as exc:
        print(f"fluid-mpi: error: {exc}", file=sys.stderr, flush=True)
        t.revoke()  # the workers are waiting for work: wake them so they can stop
        return 2
    job = Job(images=ds.images[idx], labels=ds.labels[idx], indices=idx, **job_kw)
    sink = PredictionSink(opts.predictions, append=bool(takeover_from), with_logits=opts.with_logits,
                          progress_total=None if opts.quiet else len(idx))
    if meta["family"] == "fluid":
        from .coordinator import FluidCoordinator

        outcome = FluidCoordinator(t, part, job, sink, hosts).run()
        outcome.setdefault("status", "ok")
    else:
        from .sliced import SlicedRun

        outcome = SlicedRun(t, part, job, sink, hosts).coordinate()
    sink.close()
    answered = len(sink.answered) + len(skip)
    summary = {
        "family": meta["family"], "mode": job.mode, "checkpoint": str(opts.checkpoint),
        "data": ds.source, "batch_size": opts.batch_size, "combine": opts.combine if job.mode == "ha" else None,
        "width_start": job.width, "width_end": outcome.get("width_end"),
        "ranks_start": size if not takeover_from else size + len(takeover_from),
        "ranks_end": outcome["ranks_end"], "images": len(ds), "answered": answered,
        "answered_here": len(sink.answered), "duplicates": sink.duplicates, "correct": sink.correct,
        "accuracy": round(100.0 * sink.correct / max(len(sink.answered), 1), 3),
        "elapsed_s": round(outcome["elapsed_s"], 4),
        "images_per_s": round(len(sink.answered) / max(outcome["elapsed_s"], 1e-9), 2),
        "failures": outcome["failures"], "events": outcome.get("events", []),
        "status": outcome["status"], "message": outcome.get("message", ""),
        "timeline": sink.timeline,
    }
    if takeover_from:
        summary["takeover"] = {"coordinator": t.world_rank(), "lost": takeover_from,
                               "answered_before": len(skip)}
        summary["failures"] = [failure_record(w, job.stamp_dir, takeover_at, None, None)
                               for w in takeover_from] + summary["failures"]
    write_summary(opts.summary, summary)
    if not opts.quiet:
        print(human_summary(summary), flush=True)
    return 0 if summary["status"] == "ok" else 3


def _serve_fluid(t, part, meta, opts, job_kw, hosts, empty: Job) -> int:
    from .worker import serve_fluid

    lost_total: list[int] = []
    alive = faults.alive_checker(hosts)
    while True:
        what, value = serve_fluid(t, part, empty, alive)
        lost_at = time.time()
        if what == "stop":
            return int(value)
        lost_total += list(value)
        if t.rank == 0:  # the lowest surviving rank takes over as coordinator
            print(f"fluid-mpi: coordinator (rank {min(lost_total)}) lost; rank {t.world_rank()} takes over "
                  f"on {t.size} rank(s)", file=sys.stderr, flush=True)
            return _coordinate(t, part, meta, opts, job_kw, hosts, t.size, lost_total, lost_at)
