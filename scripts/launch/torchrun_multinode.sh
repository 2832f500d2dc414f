#!/usr/bin/env bash
# Multi-node pretraining with torchrun (c10d rendezvous). Run the same command on every node:
#   NNODES=2 NPROC_PER_NODE=8 RDZV_HOST=node-001 scripts/launch/torchrun_multinode.sh runs/k1b model=kimi_linear_1b
# run_dir must be a path every node sees (shared filesystem): checkpoints and metrics go there.
set -euo pipefail
RUN_DIR=${1:?usage: $0 RUN_DIR [overrides...]}
shift
: "${NNODES:?set NNODES}" "${NPROC_PER_NODE:?set NPROC_PER_NODE}" "${RDZV_HOST:?set RDZV_HOST (first node)}"
exec torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" \
    --rdzv_backend c10d --rdzv_endpoint "$RDZV_HOST:${RDZV_PORT:-29500}" --rdzv_id "${RDZV_ID:-attnres}" \
    -m attnres_train.train run_dir="$RUN_DIR" "$@"
