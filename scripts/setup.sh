#!/usr/bin/env bash
# One-time set-up on a fresh machine: a venv in .venv with featx (CPU ONNX Runtime, Ray,
# torch for export/fine-tuning, test tools) and Debian's Fashion-MNIST when possible.
# Idempotent: a second run only checks. On an NVIDIA machine use FEATX_ORT=gpu. Without an
# NVIDIA GPU, torch comes from PyTorch's CPU index (see below and scripts/torch_index.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
ORT="${FEATX_ORT:-cpu}"   # cpu -> onnxruntime, gpu -> onnxruntime-gpu (never both)
EXTRAS="${FEATX_EXTRAS:-$ORT,torch,ray,dev}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# torch: on a machine without an NVIDIA GPU, PyTorch's CPU build (scripts/torch_index.sh says
# which index); pip's default Linux torch wheel bundles ~3 GB of CUDA libraries. Where that
# index cannot be reached (a machine that sees package registries only), pip's default torch
# is installed instead, and this says so. FEATX_TORCH=default always takes pip's default;
# FEATX_TORCH_INDEX=URL installs torch from that index instead.
INDEX="$(bash scripts/torch_index.sh)"
if [ -n "$INDEX" ] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${FEATX_TORCH_INDEX:-}" ]; then WHY="as FEATX_TORCH_INDEX says"; else WHY="no NVIDIA GPU found: the CPU build"; fi
  echo "installing torch from $INDEX ($WHY)" >&2
  if ! .venv/bin/python -m pip install -q --timeout 15 --retries 1 torch torchvision --index-url "$INDEX"; then
    echo "note: $INDEX cannot be reached; pip's default torch is installed instead, with its CUDA" \
         "libraries (about 3 GB, unused without a GPU). To avoid them, install a CPU wheel of torch" \
         "into .venv first (pip install FILE.whl), then run this script again." >&2
  fi
fi
.venv/bin/python -m pip install -q -e ".[$EXTRAS]"
# Fashion-MNIST (examples, a few tests): Debian package, needs root and apt
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) \
    || echo "note: could not install dataset-fashion-mnist; tests that need it will skip" >&2
fi
echo "featx set up in .venv ($(.venv/bin/featx --version))"
