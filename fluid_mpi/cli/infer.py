"""``fluid-mpi infer``: one rank of a distributed run (under ``mpirun``); its options' defaults come from
:class:`~fluid_mpi.runtime.options.InferOptions`."""
from __future__ import annotations

import click

from .common import DATA_DIR, options


def _infer_options(fn):
    """The options of ``infer`` (defaults from :class:`~fluid_mpi.runtime.options.InferOptions`)."""
    from ..runtime.faults import HOWS
    from ..runtime.options import COMBINES, MODES, InferOptions as D

    opts = [
        click.option("--checkpoint", "-c", type=click.Path(), required=True, envvar="FLUID_MPI_CHECKPOINT",
                     help="A checkpoint file, or a directory written by `fluid-mpi export` (part-J.pt per rank)."),
        click.option("--mode", type=click.Choice(MODES), default=D.mode, show_default=True,
                     help="Fluid only: ha = every rank sees every image, combined head; ht = ranks classify "
                          "different images; auto = HA while the cluster keeps up, HT when it does not."),
        DATA_DIR,
        click.option("--input", "input", default=None, metavar="PATH",
                     help="Your own inputs: a folder of images (PNG/JPEG/BMP...; prepared as the checkpoint "
                          "says: MNIST-like digit centring or a resize), a .npy of the model's input shape "
                          "(N×28×28 for MNIST), or - for image paths on stdin, one per line, as they arrive. "
                          "Default: the test split of --data."),
        click.option("--rate", default=None, metavar="R|R1@S1,R2@S2,...",
                     help="Replay the inputs as a Poisson stream of R images/s, or a step load (R1 images/s "
                          "for S1 seconds, then R2 ...); latency then runs from each input's arrival."),
        click.option("--seed", type=int, default=D.seed, show_default=True, help="Seed of the --rate stream."),
        click.option("--latency-ms", type=click.FloatRange(0, min_open=True), default=None,
                     help="--mode auto: switch to HT when HA would miss this latency per input."),
        click.option("--ha-deadline-ms", type=click.FloatRange(0, min_open=True), default=None,
                     help="Fluid HA (and --mode auto's HA): answer each batch once this rank's features are "
                          "ready and this many ms have passed, with the head of the groups whose features "
                          "arrived; a device late on most batches is skipped for a second. Default: wait "
                          "for every group."),
        click.option("--batch-size", "-b", type=click.IntRange(1, 4096), default=D.batch_size, show_default=True),
        click.option("--limit", type=click.IntRange(1), default=None, help="Infer the first N test images."),
        click.option("--repeat", type=click.IntRange(1), default=D.repeat, show_default=True,
                     help="Present the inputs N times, as distinct inputs (index = pass × n + i): a steady state "
                          "of a few seconds for benchmarks."),
        click.option("--summary", type=click.Path(dir_okay=False), default=None, help="Write a JSON summary here."),
        click.option("--predictions", type=click.Path(dir_okay=False), default=None,
                     help="Write one JSON line per input here (flushed per batch, fsynced every 50 ms)."),
        click.option("--events", type=click.Path(dir_okay=False), default=None,
                     help="Append one JSON line per event here (start, failure, recovery, take-over, stop)."),
        click.option("--resume", is_flag=True,
                     help="Skip the inputs already in --predictions and append the rest (after a stopped run)."),
        click.option("--with-logits", is_flag=True, help="Add the logits to every prediction line."),
        click.option("--width", type=click.IntRange(1), default=None,
                     help="Dynamic only: run width k on ranks 0..k-1."),
        click.option("--combine", type=click.Choice(COMBINES), default=D.combine, show_default=True,
                     help="Fluid HA: combined subset head, or average of the groups' own heads."),
        click.option("--rank-timeout", type=click.FloatRange(0.1), default=D.rank_timeout, show_default=True,
                     help="Seconds a rank may hold a batch (or stay silent) before it is treated as lost."),
        click.option("--kill-rank", multiple=True, metavar="R[:HOW[:AFTER]]",
                     help="Fault injection: world rank R dies (repeatable; HOW and AFTER per rank override "
                          "--kill-how/--kill-after)."),
        click.option("--kill-after", type=click.IntRange(0), default=None,
                     help="...after computing this many batches (default: halfway through its share)."),
        click.option("--kill-how", type=click.Choice(HOWS), default=D.kill_how, show_default=True),
        click.option("--quiet", "-q", is_flag=True, help="No progress output or human summary."),
    ]
    return options(*opts)(fn)


@click.command()
@_infer_options
def infer(**kw) -> None:
    """Distributed inference: run under `mpirun -np K`; each rank holds one sub-network.

    Without mpirun it runs as a single rank. Exit codes: 0 every input answered (failures survived are
    in the summary), 2 bad input, 3 the run stopped after a failure (answers so far are kept), 4 a device
    went silent and could not be excluded in-job (relaunch without it: `fluid-mpi launch` does), 5
    stopped at a safe point on request (SIGUSR2).
    """
    from ..runtime import exits
    from ..runtime.infer import run_infer
    from ..runtime.options import InferOptions

    code, finalize = run_infer(InferOptions(**kw))
    exits.planned_exit(code, finalize)  # with ULFM: os._exit, never hang in MPI_Finalize after a failure
