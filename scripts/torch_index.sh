#!/usr/bin/env bash
# Prints the pip index setup.sh installs torch from, or nothing for pip's default.
#   FEATX_TORCH_INDEX set        -> that index (an explicit choice always wins)
#   FEATX_TORCH=default          -> nothing: pip's default torch (on Linux: the CUDA build)
#   an NVIDIA GPU is visible     -> nothing: pip's default (CUDA) build
#   no NVIDIA GPU (Linux x86_64) -> PyTorch's CPU index: no 3 GB of CUDA libraries
# A GPU is "visible" when `nvidia-smi -L` lists one or /proc/driver/nvidia/gpus has an entry.
set -euo pipefail
CPU_INDEX="https://download.pytorch.org/whl/cpu"
if [ -n "${FEATX_TORCH_INDEX:-}" ]; then echo "$FEATX_TORCH_INDEX"; exit 0; fi
if [ "${FEATX_TORCH:-auto}" = default ]; then exit 0; fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then exit 0; fi
if [ -n "$(ls -A /proc/driver/nvidia/gpus 2>/dev/null)" ]; then exit 0; fi
if [ "$(uname -s)" = Linux ] && [ "$(uname -m)" = x86_64 ]; then echo "$CPU_INDEX"; fi
