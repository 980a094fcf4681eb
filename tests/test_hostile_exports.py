"""Hostile and unlucky exports: damaged calibration folders, a quantisation killed mid-way.

Real backbone (the session's exported EfficientNet-Lite0), real files, a real SIGKILL.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import make_image_folder, run_cli


def test_calibration_folder_of_unreadable_files_is_one_line(lite0, tmp_path):
    bad = tmp_path / "calib"
    (bad / "a").mkdir(parents=True)
    for i in range(3):
        (bad / "a" / f"{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (bad / "a" / "empty.png").write_bytes(b"")
    r = run_cli("export", "efficientnet_lite0", "--quantize", "int8", "--calibrate", str(bad),
                "--calib-images", "4", "--guard-images", "10", ok=False)
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    assert f"{bad}: none of the" in r.output and "could be read (first:" in r.output, r.output
    (tmp_path / "empty").mkdir()
    r = run_cli("export", "efficientnet_lite0", "--quantize", "int8", "--calibrate", str(tmp_path / "empty"),
                ok=False)
    assert r.exit_code == 1 and "need at least 2 images to calibrate on" in r.output, r.output


def _builds(folder: Path, pid: int) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".") and f"-{pid}." in p.name]


def test_a_killed_quantisation_leaves_nothing_a_rerun_trips_on(lite0, tmp_path):
    """SIGKILL while the int8 model is being built: the fp32 export is intact, and the same
    command again removes the dead build folder and publishes a working int8 export."""
    from featx.backbones.resolve import resolve_backbone
    from featx.embed.runtime import Encoder
    from featx.paths import exports_dir

    calib = make_image_folder(tmp_path / "calib", per_class=7)
    before = (lite0.onnx_path.parent / "model.json").read_bytes()
    args = [sys.executable, "-m", "featx.cli", "export", "efficientnet_lite0", "--quantize", "int8",
            "--calibrate", str(calib), "--calib-images", "4", "--guard-images", "10", "--force-quantize",
            "--json"]
    folder = exports_dir()
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and p.poll() is None and not _builds(folder, p.pid):
            time.sleep(0.05)
        if p.poll() is not None:
            pytest.skip(f"the quantisation finished before it could be killed: {p.returncode}")
        assert _builds(folder, p.pid), "no build folder appeared"
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait(60)
    assert _builds(folder, p.pid)  # what the killed process left
    assert (lite0.onnx_path.parent / "model.json").read_bytes() == before  # the fp32 export is untouched
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert not _builds(folder, p.pid)  # removed: its process is gone
    int8 = resolve_backbone(json.loads(r.stdout)["int8"]["dir"])
    assert int8.fingerprint != lite0.fingerprint
    import numpy as np

    from featx.embed.images import load_image

    px = np.stack([load_image(f, int8.preprocess) for f in sorted(calib.rglob("*.png"))[:2]])
    assert np.isfinite(Encoder(int8, device="cpu")(px)).all()
