#!/usr/bin/env bash
# Several nodes: torchrun with c10d rendezvous. Run it on every node with the same NNODES, MASTER and JOB_ID.
#   NNODES=2 MASTER=node0:29400 launch/torchrun-multi.sh train.py --lr 1e-3
# MASTER is host[:port] of any one node (the rendezvous store runs there); each agent starts NPROC ranks
# (default: one per GPU). Node ranks are assigned by the rendezvous; collectives.init() takes GROUP_RANK
# (the agent) as the node, so the topology knows which ranks share a node.
# Pick the network: GLOO_SOCKET_IFNAME=eth1 / NCCL_SOCKET_IFNAME=ib0 (exported here, seen by the ranks).
set -euo pipefail
: "${NNODES:?set NNODES, the number of nodes (or MIN:MAX for an elastic job)}"
: "${MASTER:?set MASTER=host[:port] of the rendezvous (any one node)}"
PYTHON=${PYTHON:-python}
NPROC=${NPROC:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)')}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER" --rdzv-id "${JOB_ID:-topocomm}" \
    --max-restarts "${MAX_RESTARTS:-0}" "$@"
