#!/usr/bin/env bash
# One node: torchrun --standalone, one rank per GPU (or NPROC ranks; 1 without GPUs).
#   launch/torchrun-single.sh train.py --lr 1e-3
#   NPROC=4 launch/torchrun-single.sh -m benchmarks.busbw --op all_reduce -b 1M -e 256M
# In the script: comm = collectives.init()  (reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).
set -euo pipefail
PYTHON=${PYTHON:-python}
NPROC=${NPROC:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)')}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" "$@"
