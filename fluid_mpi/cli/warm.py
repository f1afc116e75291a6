"""Entry point of warm starts (see :mod:`fluid_mpi.cluster.warm`), in the CLI layer because what a warm
process's children run is the ``fluid-mpi`` command line itself.

``python -m fluid_mpi.cli.warm serve RUN_ID`` | ``ping RUN_ID`` (exit 0: answered) |
``stub RUN_ID -- INFER-ARGS…``."""
from __future__ import annotations

import sys

from ..cluster import warm


def run_cli(argv: list[str]) -> int:
    """Run ``fluid-mpi ARGV`` in this process; returns its exit code (click's ``SystemExit`` caught)."""
    from . import cli

    try:
        cli.main(args=argv, prog_name="fluid-mpi", standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def preload() -> None:
    """Import what a rank needs (torch, numpy, fluid-mpi's runtime and CLI); run no torch operation, so
    that no thread pool exists to break in the forked children."""
    import numpy  # noqa: F401
    import torch  # noqa: F401

    from . import cli  # noqa: F401
    from ..runtime import infer  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``serve`` / ``ping`` / ``stub`` (see the module docstring)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) >= 2 and args[0] == "serve":
        preload()
        warm.serve(args[1], run_cli)
        return 0
    if len(args) >= 2 and args[0] == "ping":
        return 0 if warm.ping(args[1]) else 1
    if len(args) >= 3 and args[0] == "stub" and args[2] == "--":
        return warm.run_stub(args[1], args[3:], run_cli)
    print("usage: python -m fluid_mpi.cli.warm serve|ping RUN_ID | stub RUN_ID -- ARGS...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
