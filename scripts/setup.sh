#!/usr/bin/env bash
# One-time set-up on a fresh machine: a venv in .venv with featx (CPU ONNX Runtime, Ray,
# torch for export/fine-tuning, test tools) and Debian's Fashion-MNIST when possible.
# Idempotent: a second run only checks. On an NVIDIA machine use FEATX_ORT=gpu; on a CPU-only
# machine FEATX_TORCH_INDEX=https://download.pytorch.org/whl/cpu avoids the CUDA libraries.
set -euo pipefail
cd "$(dirname "$0")/.."
ORT="${FEATX_ORT:-cpu}"   # cpu -> onnxruntime, gpu -> onnxruntime-gpu (never both)
EXTRAS="${FEATX_EXTRAS:-$ORT,torch,ray,dev}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# CPU-only machines can skip the CUDA libraries that pip's default Linux torch wheel bundles:
# FEATX_TORCH_INDEX=https://download.pytorch.org/whl/cpu installs PyTorch's CPU build first, and
# the featx install below keeps it. Unset (the default), pip finds torch as it is configured to.
if [ -n "${FEATX_TORCH_INDEX:-}" ]; then
  .venv/bin/python -m pip install -q torch torchvision --index-url "$FEATX_TORCH_INDEX"
fi
.venv/bin/python -m pip install -q -e ".[$EXTRAS]"
# Fashion-MNIST (examples, a few tests): Debian package, needs root and apt
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) \
    || echo "note: could not install dataset-fashion-mnist; tests that need it will skip" >&2
fi
echo "featx set up in .venv ($(.venv/bin/featx --version))"
