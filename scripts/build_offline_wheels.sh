#!/usr/bin/env bash
# Wheels for running the GPU checks (scripts/gpu_check_train.py, scripts/gpu_check.sh) on a CUDA machine that
# cannot reach a package index but already has a CUDA PyTorch (which brings Triton), transformers, numpy, pyyaml
# and psutil: this project, DeepSpeed and Hydra/OmegaConf with their dependencies, and fla. Versions are the ones
# installed in the Python running this script (the versions the suite passed with); wheels with compiled code
# (pydantic-core) are fetched for the target machine's Python.
#
#   scripts/build_offline_wheels.sh OUT_DIR [--python-version 3.12]
#
# On the CUDA machine, with OUT_DIR carried next to the working tree:
#
#   python -m pip install --no-index --no-deps OUT_DIR/*.whl
#   python scripts/gpu_check_train.py
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT_DIR=
TARGET_PYTHON=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python-version) TARGET_PYTHON=$2; shift 2 ;;
    -*) echo "build_offline_wheels.sh: unknown option $1 (expected --python-version X.Y)" >&2; exit 2 ;;
    *) OUT_DIR=$1; shift ;;
  esac
done
if [[ -z $OUT_DIR ]]; then
  echo "build_offline_wheels.sh: give the output directory: build_offline_wheels.sh OUT_DIR [--python-version X.Y]" >&2
  exit 2
fi
mkdir -p "$OUT_DIR"

pinned() {  # NAME...: NAME==VERSION as installed here
  for name in "$@"; do
    version=$("$PYTHON" -c "from importlib.metadata import version; print(version('$name'))" 2>/dev/null) || {
      echo "build_offline_wheels.sh: $name is not installed in $PYTHON (run make install-test first)" >&2; exit 2; }
    echo "$name==$version"
  done
}

# Published as source only, pure Python: built here (DeepSpeed's build imports torch, hence no isolation).
# Building this project writes ./build, removed again unless it was there before.
[[ -e build ]] && had_build=1 || had_build=0
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT_DIR" . $(pinned deepspeed antlr4-python3-runtime)
[[ $had_build == 1 ]] || rm -rf build
# Published as wheels: fetched for the target Python and platform.
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version "$TARGET_PYTHON" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$OUT_DIR" \
  $(pinned hydra-core omegaconf hjson pydantic pydantic-core annotated-types typing-inspection fla-core \
    flash-linear-attention einops)
du -sh "$OUT_DIR"
ls "$OUT_DIR"
