"""``fluid-mpi train``, ``eval`` and ``export``: the model layer's commands (torch imported inside each)."""
from __future__ import annotations

import json

import click

from .common import DATA_DIR


@click.command()
@click.option("--family", type=click.Choice(["static", "dynamic", "fluid"]), required=True)
@click.option("--parts", "-k", type=click.IntRange(1, 16), default=2, show_default=True,
              help="K: number of slices/groups = number of devices.")
@DATA_DIR
@click.option("--method", type=click.Choice(["joint", "nested"]), default="joint", show_default=True,
              help="Fluid: joint = every group and head trained together on the loss of every subset (each "
                   "group good alone and in any combination); nested = the paper's nested incremental "
                   "training (stage k trains group k, earlier groups frozen).")
@click.option("--epochs", type=click.IntRange(1), default=None,
              help="Epochs over the data (per stage with --method nested). Default: 12 (4 per stage for nested).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--lr", type=float, default=5e-3, show_default=True, help="Peak of the one-cycle learning rate.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Train on the first N images only.")
@click.option("--widths", default="default", show_default=True, metavar="PRESET|C1,C2,H",
              help="Per-device widths: a preset (tiny 2,4,8 and small 4,8,16 for Pi-class devices; default "
                   "16,32,64) or the channels of conv1, conv2 and the hidden layer.")
@click.option("--arch", type=click.Choice(["paper", "cnn3"]), default="paper", show_default=True,
              help="The trunk, the same for all three families: paper = the paper's small CNN (two conv5x5 "
                   "stages); cnn3 = three conv3x3 stages, for colour pictures such as 32 x 32.")
@click.option("--image-size", default=None, metavar="H[,W]",
              help="A folder per class: resize its images to this size (default: their most common size).")
@click.option("--test-fraction", type=click.FloatRange(0.01, 0.9), default=None,
              help="A folder per class without train/ and test/: the share of each class held out for the "
                   "test split, drawn with a fixed seed (default 0.2; stored in the checkpoint).")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Checkpoint file to write.")
@click.option("--json", "as_json", is_flag=True, help="Print the accuracy report as JSON.")
def train(family, parts, data_dir, method, epochs, seed, batch_size, lr, limit, widths, arch, image_size,
          test_fraction, out, as_json) -> None:
    """Train a model and write a checkpoint (Fluid: every group good alone and in any combination)."""
    from ..model import data
    from ..model.cost import parse_widths
    from ..model.recipe import train_and_save
    from ..model.train import TrainConfig

    try:
        w = parse_widths(widths)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--widths") from None
    size = _image_size(image_size)
    epochs = epochs or (4 if method == "nested" else 12)
    cfg = TrainConfig(family, parts, w, epochs, batch_size, lr, seed, limit, method)
    train_ds = data.load_split(data_dir, "train", shape=size and (None, *size), test_fraction=test_fraction)
    spec = data.spec_for(train_ds)  # the test split is read at the training images' shape
    test_ds = data.load_split(data_dir, "test", shape=(spec.channels, spec.height, spec.width),
                              test_fraction=test_fraction)
    extra = {"test_fraction": test_fraction} if test_fraction is not None else {}
    _, meta = train_and_save(cfg, train_ds, test_ds, out, progress=not as_json, extra=extra, arch=arch)
    _report(meta, meta["accuracy"], as_json)
    if not as_json:
        click.echo(f"trained in {meta['log']['train_seconds']:.1f} s on {meta['log']['data']}; wrote {out}")


def _image_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 8 or max(values) > 512:
        raise click.BadParameter(f"{text!r}: H or H,W, 8 to 512 pixels", param_hint="--image-size")
    return (values[0], values[-1])


def _report(meta: dict, acc: dict, as_json: bool) -> None:
    from ..model.evaluate import format_report

    if as_json:
        click.echo(json.dumps({"family": meta["family"], "parts": meta["parts"], "accuracy": acc,
                               "test_data": meta.get("test_data")}))
    else:
        click.echo(format_report(meta, acc))


@click.command("eval")
@click.argument("ckpt", type=click.Path(dir_okay=False))
@DATA_DIR
@click.option("--limit", type=click.IntRange(1), default=None, help="Evaluate the first N test images.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_cmd(ckpt, data_dir, limit, as_json) -> None:
    """Accuracy of CKPT: whole model, every width/subset, every sub-network alone."""
    from ..model import checkpoint, data, evaluate

    model, meta = checkpoint.load_checkpoint(ckpt)
    spec = model.spec
    test_ds = data.load_split(data_dir, "test", shape=(spec.channels, spec.height, spec.width),
                              test_fraction=meta.get("test_fraction")).take(limit)
    meta = dict(meta, test_data=test_ds.source)
    _report(meta, evaluate.accuracy_report(model, meta["family"], test_ds), as_json)


@click.command()
@click.argument("ckpt", type=click.Path(dir_okay=False))
@click.option("--out-dir", type=click.Path(file_okay=False), required=True)
def export(ckpt, out_dir) -> None:
    """Write one small file per rank (part-J.pt) so a device loads only its sub-network."""
    from ..model import checkpoint

    for path in checkpoint.export_parts(ckpt, out_dir):
        click.echo(f"{path}\t{path.stat().st_size} bytes")
