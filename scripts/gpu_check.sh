#!/usr/bin/env bash
# One prepared GPU check of the fused Block AttnRes path, sized for under 8 minutes on one H100/H200 (autotuning
# included: our kernels have no autotune configs; fla's are warmed by each benchmark's untimed warm-up steps).
#
#   1. the gpu-marked tests of the kernels and the model (compiled kernels vs the float64 reference, bf16, large D)
#   2. bench_attnres_kernels.py: one block fwd+bwd at 16K tokens, D = 2048 and 4096 (fused vs fla vs torch),
#      with the traffic model beside the times
#   3. bench_layers.py: the sequence mixers at 16K tokens
#   4. bench_train.py on kimi_linear_1b: standard vs block_attnres fused vs block_attnres torch
#
# Every step has its own time limit; the script goes on after a failure and exits non-zero if any step failed.
# JSON goes under --out-dir (default benchmarks/results).
#
#   scripts/gpu_check.sh                       # on a GPU machine
#   scripts/gpu_check.sh --dry-run --out-dir /tmp/check   # CPU: the same steps at tiny sizes, no gpu tests
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT_DIR=benchmarks/results
DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --out-dir) OUT_DIR=$2; shift 2 ;;
    *) echo "gpu_check.sh: unknown argument $1 (expected --dry-run, --out-dir DIR)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT_DIR"

failed=()
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  if timeout "$limit" "$@"; then
    echo "== $name ok in $((SECONDS - start))s"
  else
    echo "== $name FAILED (exit $?) after $((SECONDS - start))s"
    failed+=("$name")
  fi
}

if [[ $DRY_RUN == 1 ]]; then
  step kernel-benchmark 120 "$PYTHON" scripts/bench_attnres_kernels.py --dry-run --out "$OUT_DIR/gpu_check_kernels.json"
  step traffic-model 60 "$PYTHON" scripts/bench_attnres_kernels.py --model-only --out "$OUT_DIR/gpu_check_traffic_model.json"
  step layer-benchmark 180 "$PYTHON" scripts/bench_layers.py --dry-run --out "$OUT_DIR/gpu_check_layers.json"
  step train-benchmark 180 "$PYTHON" scripts/bench_train.py --preset tiny --seq-len 64 --micro-batch 1 --rounds 1 \
    --steps 1 --warmup 1 --variants standard,block_attnres:fused,block_attnres:torch \
    --out "$OUT_DIR/gpu_check_train.json"
else
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA GPU (use --dry-run)')" || exit 2
  step gpu-tests 150 "$PYTHON" -m pytest -q -m gpu tests/kernels tests/model
  step kernel-benchmark 90 "$PYTHON" scripts/bench_attnres_kernels.py --repeats 10 --warmup 3 \
    --out "$OUT_DIR/gpu_check_kernels.json"
  step layer-benchmark 60 "$PYTHON" scripts/bench_layers.py --tokens 16384 --repeats 5 --warmup 2 \
    --out "$OUT_DIR/gpu_check_layers.json"
  step train-benchmark 150 "$PYTHON" scripts/bench_train.py --preset kimi_linear_1b --seq-len 4096 --micro-batch 2 \
    --rounds 2 --steps 3 --warmup 2 --variants standard,block_attnres:fused,block_attnres:torch \
    --out "$OUT_DIR/gpu_check_train.json"
fi

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "gpu_check.sh: FAILED steps: ${failed[*]}"
  exit 1
fi
echo "gpu_check.sh: all steps passed; JSON in $OUT_DIR"
