"""Command-line interface, the top layer: it imports every package below it, none imports it.

Heavy modules (torch, mpi4py) are imported inside each command, so that ``fluid-mpi --help`` is instant
and never starts MPI."""
from __future__ import annotations

import click

from .bench import bench
from .common import FluidGroup, setup_logging
from .infer import infer
from .launch import launch
from .model import eval_cmd, export, train
from .vcluster import vcluster


@click.group(cls=FluidGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fluid-mpi")
@click.option("--verbose", "-v", "verbosity", flag_value=1, help="Diagnostics in detail (debug messages).")
@click.option("--quiet", "-q", "verbosity", flag_value=-1, help="Warnings and errors only.")
def cli(verbosity: int | None) -> None:
    """Fluid Dynamic DNNs for reliable distributed inference on edge clusters (Xun et al., DATE 2024).

    Train a Static, Dynamic or Fluid CNN, then run it over MPI ranks:
    mpirun -np 2 fluid-mpi infer --checkpoint fluid.pt
    """
    setup_logging(verbosity or 0)


for command in (train, eval_cmd, export, infer, bench, launch, vcluster):
    cli.add_command(command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="fluid-mpi")
