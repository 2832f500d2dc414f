#!/usr/bin/env bash
# Multi-node pretraining with the deepspeed launcher (ssh-based). Run on the first node of the hostfile:
#   scripts/launch/deepspeed_multinode.sh scripts/launch/hostfile.example runs/k1b model=kimi_linear_1b train=gpu
# The launcher appends --local_rank=N to every process's argv; attnres-train strips it before Hydra parses argv.
set -euo pipefail
HOSTFILE=${1:?usage: $0 HOSTFILE RUN_DIR [overrides...]}
RUN_DIR=${2:?usage: $0 HOSTFILE RUN_DIR [overrides...]}
shift 2
MASTER_PORT=${MASTER_PORT:-29500}
exec deepspeed --hostfile "$HOSTFILE" --master_port "$MASTER_PORT" --module attnres_train.train \
    run_dir="$RUN_DIR" "$@"
