#!/usr/bin/env bash
# Run a slim job across several nodes with torchrun: start this same script on every node.
#
#   NNODES=2 NPROC_PER_NODE=8 NODE_RANK=0 MASTER_ADDR=10.0.0.1 RUN_DIR=/shared/runs/r1_w4a8 \
#       bash experiments/launch/torchrun_multinode.sh scheme=w4a8 model=deepseek_r1 model.path=/models/DeepSeek-R1-0528
#   (on the second node the same with NODE_RANK=1)
#
# RUN_DIR must be on a filesystem every node sees: each rank writes its own shards there and rank 0
# writes the index and config last. Extra arguments are slim overrides.
set -euo pipefail
: "${NNODES:?set NNODES (number of nodes)}"
: "${NPROC_PER_NODE:?set NPROC_PER_NODE (GPUs per node)}"
: "${NODE_RANK:?set NODE_RANK (0..NNODES-1)}"
: "${MASTER_ADDR:?set MASTER_ADDR (address of node 0)}"
: "${RUN_DIR:?set RUN_DIR (a run directory on a shared filesystem)}"
MASTER_PORT="${MASTER_PORT:-29500}"

exec torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" --node-rank "$NODE_RANK" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    -m slim.main hardware.nodes="$NNODES" hardware.procs_per_node="$NPROC_PER_NODE" \
    "hydra.run.dir=$RUN_DIR" "$@"
