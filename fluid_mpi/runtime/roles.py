"""What each rank does once started: the coordinator (rank 0, or the lowest survivor after a take-over)
runs the loop of its family and writes the outputs; workers serve until stopped. When the coordinator
is lost, the lowest surviving rank takes over a Fluid run (skipping what the predictions file already
holds) or, for Static/Dynamic, writes the ``failed`` summary the dead coordinator could not."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from ..errors import ExitCode, FluidError
from .events import SUMMARY_EVENTS, EventLog, FailureTracker, stopped_since
from .inputs import open_inputs
from .liveness import Liveness
from .outputs import Answered, PredictionSink, accuracy_by_answerer, read_answered
from .summary import Summary, human_summary, write_summary
from .protocol import RunSpec, Outcome
from .transport import Transport

logger = logging.getLogger("fluid_mpi.runtime")


@dataclass
class Context:
    """One rank's run: transport, its part, the checkpoint's metadata, the options and the job."""

    t: Transport
    part: object
    meta: dict
    opts: object  # InferOptions
    job: RunSpec
    liveness: Liveness
    draining: Callable[[], bool]
    started_at: float = 0.0  # unix time this rank started: a stop event after it ends this run

    @property
    def fluid(self) -> bool:
        return self.meta["family"] == "fluid"


def measure_rates(part, batch_size: int) -> tuple[float, float]:
    """Images/s of this sub-network's features and logits at ``batch_size`` (median of 7 timed forwards
    on a blank batch after a warm-up one, interleaved so that a burst of load hits both alike): the auto
    policy's first capacity estimates, corrected from the answers once the run goes."""
    import statistics

    import torch

    s = part.spec
    x = torch.zeros(batch_size, s.channels, s.height, s.width)
    times: dict = {part.features: [], part.logits: []}
    with torch.inference_mode():
        for fn in times:
            fn(x)
        for _ in range(7):
            for fn, seen in times.items():
                t0 = time.perf_counter()
                fn(x)
                seen.append(time.perf_counter() - t0)
    return tuple(batch_size / max(statistics.median(seen), 1e-9) for seen in times.values())


def coordinate(ctx: Context, lost_before: list[int] | None = None, lost_at: float = 0.0) -> int:
    """Coordinate a run (``lost_before``: the coordinators lost before this rank took over)."""
    t, opts = ctx.t, ctx.opts
    events = EventLog(opts.events)
    carry_on = bool(opts.resume or lost_before)
    done = read_answered(opts.predictions, repair=True) if carry_on else Answered()
    try:
        stream = open_inputs(opts, done.indices, ctx.meta)
    except FluidError as exc:
        logger.error(f"fluid-mpi: error: {exc}")
        events.emit("stop", status="bad input", exit_code=ExitCode.BAD_INPUT, message=str(exc))
        t.revoke()  # the workers are waiting for work: wake them so they can stop
        return ExitCode.BAD_INPUT
    job = ctx.job
    hosts = ctx.liveness.hosts
    ranks_start = t.size + len(lost_before or [])
    todo = None if stream.total is None else stream.total - len(done.indices)
    events.emit("start", coordinator=t.world_rank(), ranks=t.size, family=ctx.meta["family"], mode=job.mode,
                hosts=[list(hosts[w]) for w in t.members], inputs=stream.description, images=stream.total,
                todo=todo, resumed=len(done.indices), torn_lines_repaired=done.torn,
                **expected_accuracy(ctx.meta))
    sink = PredictionSink(opts.predictions, append=carry_on, with_logits=opts.with_logits,
                          progress_total=None if opts.quiet else todo, classes=ctx.part.spec.classes)
    if ctx.fluid:
        from .coordinator import FluidCoordinator

        policy, rates = None, (1.0, 1.0)
        if job.mode == "auto":
            from .adaptive import ModePolicy

            rates = measure_rates(ctx.part, job.batch_size)
            policy = ModePolicy(opts.latency_ms, rates[0], rates[1] * t.size, start=time.monotonic())
        loop = FluidCoordinator(t, ctx.part, job, sink, ctx.liveness, events, ctx.draining, stream, policy, rates)
    else:
        from .sliced import SlicedRun

        loop = SlicedRun(t, ctx.part, job, ctx.liveness, sink, events)
    if lost_before:  # the lost coordinators are this loop's failures: its next answer ends their outage
        events.emit("takeover", coordinator=t.world_rank(), lost=lost_before)
        loop.tracker.lost(lost_before, lost_at, {}, None)
    try:
        outcome = loop.run() if ctx.fluid else loop.coordinate(stream)
    finally:
        sink.close()  # what was answered is made durable even when the loop raises
    by_mode = loop.by_mode if ctx.fluid else None
    summary = _summary(ctx, events, outcome, stream.description, stream.total,
                       len(done.indices) + len(sink.answered), sink, done, ranks_start)
    summary.max_backlog, summary.by_mode = stream.max_backlog, by_mode
    if ctx.fluid and loop.deadline is not None:
        summary.ha_deadline = loop.deadline.summary()
    if lost_before:
        summary.takeover = {"coordinator": t.world_rank(), "lost": lost_before, "answered_before": len(done.indices)}
    return _finish(opts, events, summary, outcome)


def expected_accuracy(meta: dict) -> dict:
    """What the checkpoint's test accuracy says each mode costs (Fluid): ``{"expected_accuracy": {"ha": %,
    "ht_mix": %, "data": ...}}``, HA being the head of all groups and HT's mix each group's own head in equal
    shares; {} when the checkpoint has no accuracy report."""
    acc = meta.get("accuracy") or {}
    subsets = acc.get("subsets") or {}
    parts = int(meta.get("parts", 0))
    if meta.get("family") != "fluid" or not all(str(g) in subsets for g in range(parts)):
        return {}
    ht_mix = acc.get("ht_mix", round(sum(subsets[str(g)] for g in range(parts)) / parts, 2))
    return {"expected_accuracy": {"ha": acc.get("full"), "ht_mix": ht_mix, "data": meta.get("test_data")}}


def _summary(ctx: Context, events: EventLog, outcome: Outcome, source: str, images: int | None, answered: int,
             sink: PredictionSink | None, done: Answered, ranks_start: int) -> Summary:
    opts, job = ctx.opts, ctx.job
    here = len(sink.answered) if sink else 0
    correct = sink.correct if sink else 0
    labelled = sink.labelled if sink else 0
    return Summary(
        family=ctx.meta["family"], mode=job.mode, checkpoint=str(opts.checkpoint), data=source,
        batch_size=opts.batch_size, combine=opts.combine if job.mode == "ha" else None,
        width_start=job.width, width_end=outcome.width_end, ranks_start=ranks_start, ranks_end=outcome.ranks_end,
        images=images, answered=answered, answered_here=here, resumed=len(done.indices),
        torn_lines_repaired=done.torn, duplicates=sink.duplicates if sink else 0, correct=correct,
        accuracy=round(100.0 * correct / max(labelled, 1), 3) if labelled else None,
        accuracy_by=accuracy_by_answerer(sink.by_answerer) if sink else {},
        elapsed_s=round(outcome.elapsed_s, 4),
        images_per_s=round(here / max(outcome.elapsed_s, 1e-9), 2),
        latency_ms=sink.latency.percentiles() if sink else None, max_backlog=0,
        errors=sink.errors if sink else 0, by_mode=None, status=outcome.status,
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
        stop = stopped_since(ctx.opts.events, ctx.started_at)
        if stop is not None:  # cut off from a run that has already ended: exit as that run did
            # a slow rank can see the coordinator's exit as a failure after a clean stop: that is exit 0
            code = int(stop.get("exit_code", ExitCode.STOPPED))
            (logger.info if code == ExitCode.OK else logger.error)(
                f"fluid-mpi: rank {t.world_rank()}: the run has already stopped ({stop.get('status')}); "
                "not taking over")
            return code
        if ctx.fluid:  # the lowest surviving rank takes over as coordinator
            logger.warning(f"fluid-mpi: coordinator (rank {min(lost)}) lost; rank {t.world_rank()} takes over "
                           f"on {t.size} rank(s)")
            return coordinate(ctx, lost, lost_at)
        return _report_lost_coordinator(ctx, lost, lost_at, end.code)


def _report_lost_coordinator(ctx: Context, lost: list[int], lost_at: float, code: int) -> int:
    """Static/Dynamic without slice 0: the lowest survivor writes the ``failed`` summary and stop event."""
    events = EventLog(ctx.opts.events)
    FailureTracker(events, ctx.liveness.hosts, ctx.job.stamp_dir, time.time()).lost(lost, lost_at, {}, None)
    done = read_answered(ctx.opts.predictions, repair=True)
    try:
        stream = open_inputs(ctx.opts, set(), ctx.meta)
        source, images = stream.description, stream.total
    except FluidError:
        source, images = "?", None
    message = "lost rank 0 (slice 0): the run cannot go on"
    outcome = Outcome(0.0, ctx.t.size, "failed", message, width_end=0)
    summary = _summary(ctx, events, outcome, source, images, len(done.indices), None, done, ctx.t.size + len(lost))
    summary.resumed = 0
    return _finish(ctx.opts, events, summary, outcome)
