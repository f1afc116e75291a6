"""``fluid-mpi bench``: a command group; ``fluid-mpi bench`` alone (or ``bench throughput``) runs the
paper's comparison, ``bench cluster | faults | adaptive`` the other measurements. Each launches mpirun
itself (not under mpirun); the bench package is imported only when a command runs."""
from __future__ import annotations

from pathlib import Path

import click

from .common import DATA_DIR, options as _options

OUT = click.option("--out", type=click.Path(file_okay=False), default="runs/bench", show_default=True,
                   help="Where the report, its JSON and the trained checkpoints go.")
PARTS = click.option("--parts", "-k", type=click.IntRange(2, 8), default=2, show_default=True, help="K ranks.")
PUBLISH = click.option("--publish", type=click.Path(file_okay=False), default=None, metavar="DIR",
                       help="Then copy the report, its JSON and its plots into DIR (e.g. docs).")


def _quick(what: str) -> click.Option:
    return click.option("--quick", is_flag=True, help=f"Embedded data, short training, {what}.")


_throughput_options = _options(
    _quick("2 interleaved repetitions per row at batch 64 and 1"), OUT, DATA_DIR, PARTS, PUBLISH,
    click.option("--batch-sizes", default=None, metavar="B,B,...",
                 help="Batch sizes of the throughput and latency rows (default 64,16,1; --quick: 64,1); "
                      "the goals are at 64 and 1."))


@click.group(invoke_without_command=True)
@_throughput_options
@click.pass_context
def bench(ctx: click.Context, **kw) -> None:
    """Measure the paper's comparison on this machine. Alone: the same as ``bench throughput``."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(throughput, **kw)


@bench.command()
@_throughput_options
def throughput(quick, out, data_dir, parts, publish, batch_sizes) -> None:
    """Static, Dynamic and Fluid (HA, HT) over MPI on this machine: images/s, latency, accuracy, a rank
    killed halfway, failure detection. Writes OUT/results.json, OUT/results.md and PNG plots."""
    from ..bench import throughput as bm

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


@bench.command()
@_options(_quick("3 settings, 1 repetition each"), OUT, DATA_DIR, PARTS, PUBLISH)
def cluster(quick, out, data_dir, parts, publish) -> None:
    """The comparison over TCP between the hosts of a virtual cluster (root; network namespaces on this
    machine) for 3 links and 3 compute speeds; adds its tables to OUT's report (else OUT/cluster.md)."""
    from ..bench import throughput as bm

    c = bm.run_cluster_bench(bm.BenchConfig.make(out, data_dir, parts, quick))
    for st in c["settings"]:
        q = st["ratios"]
        click.echo(f"{st['link']}, {st['cpus'] or 'full'} CPU: Fluid HT / Static {q['fluid_ht_over_static']}x, "
                   f"Fluid HT / Dynamic's best {q['fluid_ht_over_dynamic_best']}x")
    report = Path(out) / ("results.md" if c["merged"] else "cluster.md")
    click.echo(f"cluster bench {c['wall_s']} s; report: {report}")
    if publish and c["merged"]:
        bm.publish(Path(out), Path(publish))


def _scenario_names() -> list[str]:
    return ["power-off", "cable", "data-cable", "freeze", "rejoin", "coordinator"]


@bench.command()
@_options(_quick("one run of each fault kind"), OUT, DATA_DIR, PUBLISH,
          click.option("--scenario", "only", multiple=True, type=click.Choice(_scenario_names()),
                       help="Run only this fault kind (repeatable). Default: all of them."))
def faults(quick, out, data_dir, publish, only) -> None:
    """A whole device lost (power-off, cable, freeze, power-on, the coordinator's device) on a virtual
    cluster (root), 5 repetitions each under ``fluid-mpi launch``; writes OUT/faults.md and faults.json
    (--publish DIR: DIR/fault-results.*)."""
    from ..bench.faults import FaultConfig, publish_faults, run_faults

    r = run_faults(FaultConfig.make(out, data_dir, quick, tuple(only)))
    for row in r["rows"]:
        med = (row["next_answer_s"] or {}).get("median")
        rejoin = (f", rejoin median {(row['rejoin_s'] or {}).get('median')} s" if "rejoin_met" in row else "")
        click.echo(f"{row['label']}: {row['ok']}/{row['runs']} runs ok, fault -> next answer median {med} s "
                   f"(goal {row['goal_next_s']:g} s){rejoin}")
    click.echo(f"fault bench {r['wall_s']} s; report: {Path(out) / 'faults.md'}")
    if publish:
        publish_faults(Path(out), Path(publish))


@bench.command()
@_options(_quick("fewer loads and repetitions"), OUT, DATA_DIR, PARTS, PUBLISH)
def adaptive(quick, out, data_dir, parts, publish) -> None:
    """HA, HT and --mode auto under an offered load (10-120 % of HT's capacity) and a step load; writes
    OUT/adaptive.md, adaptive.json, img/adaptive-*.png (--publish DIR: DIR/adaptive-results.*)."""
    from ..bench.adaptive import AdaptiveConfig, publish_adaptive, run_adaptive

    r = run_adaptive(AdaptiveConfig.make(out, data_dir, parts, quick))
    for g in r["goals"]:
        click.echo(f"{g['goal']}: {g['verdict']}")
    click.echo(f"adaptive bench {r['wall_s']} s; report: {Path(out) / 'adaptive.md'}")
    if publish:
        publish_adaptive(Path(out), Path(publish))


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r}: comma-separated integers", param_hint=name) from None


@bench.command()
@_options(_quick("1 epoch on 500 images, K = 2"), OUT, DATA_DIR, PUBLISH,
          click.option("--preset", "presets", multiple=True, type=click.Choice(["tiny", "small", "default"]),
                       help="Per-device width preset (repeatable). Default: tiny."),
          click.option("--parts", "-k", "ks", default="2,4,8", show_default=True, metavar="K,K,...",
                       help="Cluster sizes; K = 8 for the first preset only (the smallest)."),
          click.option("--seeds", default="0", show_default=True, metavar="S,S,...",
                       help="Training seeds; accuracy is the mean over them (the goals ask for two)."),
          click.option("--epochs", type=click.IntRange(1), default=12, show_default=True,
                       help="Training epochs (fluid-mpi train's default)."),
          click.option("--fluid-widths", "fluid_widths", multiple=True, metavar="C1,C2,H",
                       help="Another Fluid row at these per-device widths, for every preset and K (repeatable: "
                            "a sweep between a preset and equal cost)."),
          click.option("--no-train", is_flag=True,
                       help="Report what OUT/checkpoints holds; list the models it lacks instead of training them."))
def accuracy(quick, out, data_dir, publish, presets, ks, seeds, epochs, fluid_widths, no_train) -> None:
    """Static, Dynamic and Fluid (HA, HT mix, each group, by subset size; at the preset's widths and at
    equal per-device cost) and replication, per width preset and K: accuracy beside per-device
    multiply-adds, parameters and forward time, with the goals' verdicts. Trains what OUT/checkpoints
    lacks; writes OUT/accuracy.md and accuracy.json (--publish DIR: DIR/accuracy-results.*)."""
    import shutil

    from ..bench.accuracy import AccuracyConfig, fluid_keys, run_accuracy
    from ..model.cost import parse_widths

    try:
        widths = tuple(parse_widths(w) for w in fluid_widths)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--fluid-widths") from None
    cfg = AccuracyConfig(Path(out), data_dir, tuple(presets) or ("tiny",), _ints(ks, "--parts"),
                         _ints(seeds, "--seeds"), epochs, train=not no_train, fluid_widths=widths)
    if quick:
        cfg.ks, cfg.epochs, cfg.limit = (2,), 1, 500
    r = run_accuracy(cfg)
    for row in r["rows"]:
        for fam in fluid_keys(row):
            if "goals" in row[fam]:
                met = [k for k, v in row[fam]["goals"].items() if v is False]
                click.echo(f"{row['preset']} K={row['k']} {fam}: HA {row[fam]['ha']:.2f} vs Static "
                           f"{row['static']['full']:.2f}; goals not met: {', '.join(met) or 'none'}")
    click.echo(f"accuracy bench {r['wall_s']} s; report: {Path(out) / 'accuracy.md'}")
    if publish:
        for ext in ("md", "json"):
            shutil.copyfile(Path(out) / f"accuracy.{ext}", Path(publish) / f"accuracy-results.{ext}")


@bench.command()
@_options(_quick("K = 2 only, one repetition"), OUT, DATA_DIR, PUBLISH)
def uneven(quick, out, data_dir, publish) -> None:
    """Devices of unequal speed on a virtual cluster (root), K = 2 and 4: one host slowed, one stalling;
    Static, Dynamic, Fluid HT, HA and HA with --ha-deadline-ms, each host alone; the goals' verdicts.
    Writes OUT/uneven.md and uneven.json (--publish DIR: DIR/uneven-results.*)."""
    import shutil

    from tqdm import tqdm

    from ..bench import throughput as bm
    from ..bench.report_uneven import write_report
    from ..bench.uneven import UnevenConfig, run_uneven

    ks = (2,) if quick else (2, 4)
    bar = tqdm(desc="uneven", unit="run", leave=False)
    ckpts = {}
    for k in ks:
        for family, path in bm.ensure_checkpoints(bm.BenchConfig.make(out, data_dir, k, quick), bar).items():
            ckpts[(family, k)] = path
    cfg = UnevenConfig(Path(out), ckpts, data_dir, ks)
    if quick:
        cfg.reps = 1
    r = run_uneven(cfg, bar)
    bar.close()
    write_report(r, Path(out) / "uneven.md")
    for run in r["runs"]:
        for g in run["goals"]:
            click.echo(f"K={run['k']} {g['goal']}: {g['measured']} -> {g['met']}")
    click.echo(f"uneven bench {r['wall_s']} s; report: {Path(out) / 'uneven.md'}")
    if publish:
        for ext in ("md", "json"):
            shutil.copyfile(Path(out) / f"uneven.{ext}", Path(publish) / f"uneven-results.{ext}")
