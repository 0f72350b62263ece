#!/usr/bin/env bash
# mpirun / mpiexec (MPICH/Hydra, Intel MPI, Open MPI): NP ranks, on HOSTS (host:slots,...) if given.
#   NP=4 launch/mpirun.sh train.py                        # gloo/NCCL; rank 0's address is shared over MPI
#   NP=4 TOPOCOMM_BACKEND=mpi launch/mpirun.sh train.py   # every collective over MPI itself (CPU tensors)
#   NP=16 HOSTS=node0:8,node1:8 launch/mpirun.sh train.py
# Needs mpi4py in the Python environment (pip install mpi4py, or mpi4py + the mpich wheel).
set -euo pipefail
PYTHON=${PYTHON:-python}
MPIEXEC=${MPIEXEC:-mpiexec}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
args=(-n "${NP:-4}")
if "$MPIEXEC" --version 2>&1 | grep -q "Open MPI"; then
    if [[ -n "${HOSTS:-}" ]]; then args+=(--host "$HOSTS"); fi
    # Open MPI forwards only the variables named with -x.
    for v in PATH PYTHONPATH OMP_NUM_THREADS TOPOCOMM_BACKEND TOPOCOMM_ALGO MASTER_ADDR MASTER_PORT \
             GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME RES_OPTIONS; do
        if [[ -n "${!v:-}" ]]; then args+=(-x "$v"); fi
    done
elif [[ -n "${HOSTS:-}" ]]; then
    args+=(-hosts "$HOSTS")
fi
exec "$MPIEXEC" "${args[@]}" "$PYTHON" "$@"
