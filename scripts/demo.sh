#!/usr/bin/env bash
# The main job on the offline embedded data: set up .venv/, train a small Fluid model (its two groups
# trained to be good alone and together), then run it on 2 MPI ranks in High-Accuracy mode, and in
# High-Throughput mode killing rank 1 halfway through to show the survivor finishing every input.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export PATH="$PWD/.venv/bin:$PATH"
mkdir -p runs/demo
fluid-mpi train --family fluid --parts 2 --out runs/demo/fluid.pt
echo; echo "== 2 ranks, High-Accuracy mode"
mpirun -np 2 -hostfile hostfiles/localhost fluid-mpi infer -c runs/demo/fluid.pt --mode ha \
    --summary runs/demo/ha.json --predictions runs/demo/ha.jsonl
echo; echo "== 2 ranks, High-Throughput mode, rank 1 killed (SIGKILL) halfway"
mpirun -np 2 -hostfile hostfiles/localhost fluid-mpi infer -c runs/demo/fluid.pt --mode ht --kill-rank 1 \
    --summary runs/demo/ht-kill.json --predictions runs/demo/ht-kill.jsonl
echo; echo "summaries and predictions are in runs/demo/"
