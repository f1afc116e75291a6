#!/usr/bin/env bash
# The whole test suite, from a fresh machine: set up .venv/ (torch CPU, Open MPI with ULFM, mpi4py),
# then run pytest, MPI fault tests included (real mpirun, real signals, hard timeouts).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1  # CI runs as root
exec .venv/bin/python -m pytest -ra "$@"
