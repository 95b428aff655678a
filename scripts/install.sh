#!/usr/bin/env bash
# Install loraplex (editable) with the extras named in $1 (e.g. "dev,triton"), and a torch
# build that fits this machine first:
#   - an importable torch is kept as it is (nothing is downloaded);
#   - with an NVIDIA GPU (nvidia-smi lists one): torch from the default index (on Linux,
#     PyPI's torch is the CUDA build);
#   - without one: the CPU build from PyTorch's CPU wheel index (PyPI's Linux torch would pull
#     several GB of CUDA libraries); where that index cannot be reached, torch from the default
#     index (machines whose configured mirror serves a CPU build).
# Environment: PYTHON (see python.sh), TORCH_VERSION (default 2.13.0, the version the tests
# run on), TORCH_CPU_INDEX (default PyTorch's CPU index).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python.sh
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
extras=${1:-}

if "$PY" -c "import torch" 2>/dev/null; then
  echo "install: torch $("$PY" -c 'import torch; print(torch.__version__)') already installed"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "install: NVIDIA GPU found: torch==$TORCH_VERSION from the default index (CUDA build)"
  "$PY" -m pip install "torch==$TORCH_VERSION"
else
  echo "install: no NVIDIA GPU: torch==$TORCH_VERSION from $TORCH_CPU_INDEX (CPU build)"
  if ! "$PY" -m pip install --timeout 30 --retries 1 --index-url "$TORCH_CPU_INDEX" \
      "torch==$TORCH_VERSION"; then
    echo "install: $TORCH_CPU_INDEX failed; torch==$TORCH_VERSION from the default index"
    "$PY" -m pip install "torch==$TORCH_VERSION"
  fi
fi
"$PY" -m pip install -q -e ".${extras:+[$extras]}"
