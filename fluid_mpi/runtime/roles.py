"""What each rank does once started: the coordinator (rank 0, or the lowest survivor after a take-over)
runs the loop of its family and writes the outputs; workers serve until stopped. When the coordinator
is lost, the lowest surviving rank takes over a Fluid run (skipping what the predictions file already
holds) or, for Static/Dynamic, writes the ``failed`` summary the dead coordinator could not."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from ..errors import FluidError
from .events import SUMMARY_EVENTS, EventLog, FailureTracker
from .liveness import Liveness
from .outputs import Answered, PredictionSink, Summary, human_summary, read_answered, write_summary
from .protocol import EXIT_BAD_INPUT, Job, Outcome
from .transport import Transport


@dataclass
class Context:
    """One rank's run: transport, its part, the checkpoint's metadata, the options and the job."""

    t: Transport
    part: object
    meta: dict
    opts: object  # InferOptions
    job: Job
    liveness: Liveness
    draining: Callable[[], bool]

    @property
    def fluid(self) -> bool:
        return self.meta["family"] == "fluid"


def _load_inputs(ctx: Context, skip: set[int]):
    from ..model.data import load_split

    ds = load_split(ctx.opts.data_dir, "test").take(ctx.opts.limit)
    if ctx.opts.repeat > 1:  # input i of pass p is input p * n + i: distinct, answered once each
        ds = replace(ds, images=np.tile(ds.images, (ctx.opts.repeat, 1, 1)), labels=np.tile(ds.labels, ctx.opts.repeat),
                     source=f"{ds.source}, {ctx.opts.repeat} passes")
    idx = np.arange(len(ds), dtype=np.int64)
    if skip:
        idx = idx[~np.isin(idx, np.fromiter(skip, np.int64, len(skip)))]
    return ds, idx


def coordinate(ctx: Context, lost_before: list[int] | None = None, lost_at: float = 0.0) -> int:
    """Coordinate a run (``lost_before``: the coordinators lost before this rank took over)."""
    t, opts = ctx.t, ctx.opts
    events = EventLog(opts.events)
    carry_on = bool(opts.resume or lost_before)
    done = read_answered(opts.predictions, repair=True) if carry_on else Answered()
    try:
        ds, idx = _load_inputs(ctx, done.indices)
    except FluidError as exc:
        print(f"fluid-mpi: error: {exc}", file=sys.stderr, flush=True)
        events.emit("stop", status="bad input", exit_code=EXIT_BAD_INPUT, message=str(exc))
        t.revoke()  # the workers are waiting for work: wake them so they can stop
        return EXIT_BAD_INPUT
    job = replace(ctx.job, images=ds.images[idx], labels=ds.labels[idx], indices=idx)
    hosts = ctx.liveness.hosts
    ranks_start = t.size + len(lost_before or [])
    events.emit("start", coordinator=t.world_rank(), ranks=t.size, family=ctx.meta["family"], mode=job.mode,
                hosts=[list(hosts[w]) for w in t.members], images=len(ds), todo=len(idx),
                resumed=len(done.indices), torn_lines_repaired=done.torn)
    tracker = FailureTracker(events, hosts, job.stamp_dir, time.time())
    if lost_before:
        events.emit("takeover", coordinator=t.world_rank(), lost=lost_before)
        tracker.lost(lost_before, lost_at, {}, None)
    sink = PredictionSink(opts.predictions, append=carry_on, with_logits=opts.with_logits,
                          progress_total=None if opts.quiet else len(idx))
    if ctx.fluid:
        from .coordinator import FluidCoordinator

        loop = FluidCoordinator(t, ctx.part, job, sink, ctx.liveness, events, ctx.draining)
        loop.tracker = tracker
        outcome = loop.run()
    else:
        from .sliced import SlicedRun

        loop = SlicedRun(t, ctx.part, job, ctx.liveness, sink, events)
        loop.tracker = tracker
        outcome = loop.coordinate()
    sink.close()
    summary = _summary(ctx, events, outcome, ds.source, len(ds), len(done.indices) + len(sink.answered), sink,
                       done, ranks_start)
    if lost_before:
        summary.takeover = {"coordinator": t.world_rank(), "lost": lost_before, "answered_before": len(done.indices)}
    return _finish(opts, events, summary, outcome)


def _summary(ctx: Context, events: EventLog, outcome: Outcome, source: str, images: int, answered: int,
             sink: PredictionSink | None, done: Answered, ranks_start: int) -> Summary:
    opts, job = ctx.opts, ctx.job
    here = len(sink.answered) if sink else 0
    correct = sink.correct if sink else 0
    return Summary(
        family=ctx.meta["family"], mode=job.mode, checkpoint=str(opts.checkpoint), data=source,
        batch_size=opts.batch_size, combine=opts.combine if job.mode == "ha" else None,
        width_start=job.width, width_end=outcome.width_end, ranks_start=ranks_start, ranks_end=outcome.ranks_end,
        images=images, answered=answered, answered_here=here, resumed=len(done.indices),
        torn_lines_repaired=done.torn, duplicates=sink.duplicates if sink else 0, correct=correct,
        accuracy=round(100.0 * correct / max(here, 1), 3), elapsed_s=round(outcome.elapsed_s, 4),
        images_per_s=round(here / max(outcome.elapsed_s, 1e-9), 2), latency_ms=sink.latency_ms() if sink else None,
        status=outcome.status,
        exit_code=outcome.exit_code, message=outcome.message, failures=events.of("failure"),
        events=events.of(*SUMMARY_EVENTS), timeline=sink.timeline if sink else [])


def _finish(opts, events: EventLog, summary: Summary, outcome: Outcome) -> int:
    write_summary(opts.summary, summary.to_dict())
    events.emit("stop", status=outcome.status, answered=summary.answered, images=summary.images,
                exit_code=outcome.exit_code, message=outcome.message, silent_hosts=list(outcome.silent_hosts))
    events.close()
    if not opts.quiet:
        print(human_summary(summary.to_dict()), flush=True)
    return outcome.exit_code


def serve(ctx: Context) -> int:
    """A worker rank: serve until stopped; take over (Fluid) or report (Static/Dynamic) when the
    coordinator is lost and this rank is the lowest survivor."""
    t = ctx.t
    while True:
        if ctx.fluid:
            from .worker import serve_fluid

            end = serve_fluid(t, ctx.part, ctx.job, ctx.liveness)
        else:
            from .sliced import SlicedRun

            end = SlicedRun(t, ctx.part, ctx.job, ctx.liveness).serve()
        lost_at = time.time()
        if not end.coordinator_lost or t.rank != 0:
            if end.coordinator_lost and ctx.fluid:
                continue  # serve the rank that takes over
            return end.code
        lost = sorted(set(end.lost))
        if ctx.fluid:  # the lowest surviving rank takes over as coordinator
            print(f"fluid-mpi: coordinator (rank {min(lost)}) lost; rank {t.world_rank()} takes over "
                  f"on {t.size} rank(s)", file=sys.stderr, flush=True)
            return coordinate(ctx, lost, lost_at)
        return _report_lost_coordinator(ctx, lost, lost_at, end.code)


def _report_lost_coordinator(ctx: Context, lost: list[int], lost_at: float, code: int) -> int:
    """Static/Dynamic without slice 0: the lowest survivor writes the ``failed`` summary and stop event."""
    events = EventLog(ctx.opts.events)
    FailureTracker(events, ctx.liveness.hosts, ctx.job.stamp_dir, time.time()).lost(lost, lost_at, {}, None)
    done = read_answered(ctx.opts.predictions, repair=True)
    try:
        ds, _ = _load_inputs(ctx, set())
        source, images = ds.source, len(ds)
    except FluidError:
        source, images = "?", 0
    message = "lost rank 0 (slice 0): the run cannot go on"
    outcome = Outcome(0.0, ctx.t.size, "failed", message, width_end=0)
    summary = _summary(ctx, events, outcome, source, images, len(done.indices), None, done, ctx.t.size + len(lost))
    summary.resumed = 0
    return _finish(ctx.opts, events, summary, outcome)
