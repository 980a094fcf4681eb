"""scripts/torch_index.sh: which torch setup.sh installs (issue 27, item 6)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "torch_index.sh"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def index(env: dict, path: str) -> str:
    e = {k: v for k, v in os.environ.items() if not k.startswith("FEATX_TORCH")} | env | {"PATH": path}
    return subprocess.run(["bash", str(SCRIPT)], env=e, capture_output=True, text=True, check=True).stdout.strip()


def gpu_visible() -> bool:
    try:
        return "GPU" in subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    except OSError:
        return Path("/proc/driver/nvidia/gpus").is_dir() and any(Path("/proc/driver/nvidia/gpus").iterdir())


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64", reason="Linux x86_64 rule")
def test_no_gpu_means_the_cpu_index_and_a_gpu_means_the_default(tmp_path):
    path = os.environ["PATH"]
    expected = "" if gpu_visible() else CPU_INDEX
    assert index({}, path) == expected
    fake = tmp_path / "bin"  # a machine whose nvidia-smi lists a GPU
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-0)'\n")
    (fake / "nvidia-smi").chmod(0o755)
    assert index({}, f"{fake}:{path}") == ""


def test_an_explicit_choice_wins():
    path = os.environ["PATH"]
    assert index({"FEATX_TORCH_INDEX": "https://example.org/simple"}, path) == "https://example.org/simple"
    assert index({"FEATX_TORCH": "default"}, path) == ""
