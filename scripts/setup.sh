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
  # only an index that answers: pip's own config may add local wheels, and a local CPU torch
  # beside PyPI's torchvision does not import ("operator torchvision::nms does not exist")
  if .venv/bin/python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1].rstrip('/') + '/torch/', timeout=10)" "$INDEX" 2>/dev/null; then
    echo "installing torch from $INDEX ($WHY)" >&2
    .venv/bin/python -m pip install -q --timeout 15 --retries 1 torch torchvision --index-url "$INDEX" || true
  fi
  if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
    .venv/bin/python -m pip uninstall -q -y torch torchvision >/dev/null 2>&1 || true
    echo "note: no CPU build of torch + torchvision from $INDEX (not reachable from here); pip's" \
         "default torch is installed instead, with its CUDA libraries (about 3 GB, unused without a" \
         "GPU). To avoid them, install a matching CPU torch + torchvision into .venv first, then" \
         "run this script again." >&2
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
