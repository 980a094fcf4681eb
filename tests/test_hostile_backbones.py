"""Hostile and unlucky backbones: tampered model.json, foreign or broken ONNX files, killed exports.

Each gives a clear FeatXError naming the file (never a traceback), and nothing a
killed export leaves behind survives the next export.
"""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from featx.backbones.artifact import SidecarError, clean_stale_builds, fingerprint_of, load_export
from featx.backbones.cards import get_card
from featx.backbones.export import export_card
from featx.backbones.resolve import resolve_backbone
from featx.cli import main
from featx.errors import FeatXError

from .helpers import make_image_folder

SPEC = {"input_size": 32, "resize_size": 36, "interpolation": "bilinear",
        "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}


def _edit(meta: dict, **changes) -> dict:
    meta = json.loads(json.dumps(meta))
    for key, value in changes.items():
        if value is _DROP:
            meta.pop(key, None)
        else:
            meta[key] = value
    return meta


_DROP = object()
# (case, what model.json becomes: bytes, or a function of the real sidecar dict)
TAMPERED = [
    ("bad JSON", b'{"name": "efficientnet_lite0", "dim": 12'),
    ("not UTF-8", b"\xff\xfe\x00garbage"),
    ("not an object", b"[1, 2, 3]"),
    ("dim missing", lambda m: _edit(m, dim=_DROP)),
    ("preprocess missing", lambda m: _edit(m, preprocess=_DROP)),
    ("fingerprint missing", lambda m: _edit(m, fingerprint=_DROP)),
    ("dim not a number", lambda m: _edit(m, dim="wide")),
    ("dim a boolean", lambda m: _edit(m, dim=True)),
    ("dim negative", lambda m: _edit(m, dim=-3)),
    ("preprocess a list", lambda m: _edit(m, preprocess=[224, 256])),
    ("preprocess unknown key", lambda m: _edit(m, preprocess={**m["preprocess"], "gamma": 2})),
    ("preprocess wrong type", lambda m: _edit(m, preprocess={**m["preprocess"], "input_size": "224"})),
    ("input name a number", lambda m: _edit(m, input={"name": 5})),
    ("parity malformed", lambda m: _edit(m, parity={"images": 4, "oops": 1})),
    ("quantization malformed", lambda m: _edit(m, quantization={"method": "minmax", "guard": 3})),
    ("name a list", lambda m: _edit(m, name=["a"])),
]


@pytest.fixture
def export_copy(lite0, tmp_path) -> Path:
    d = tmp_path / "exp"
    shutil.copytree(lite0.onnx_path.parent, d)
    return d


def _tamper(directory: Path, change) -> None:
    side = directory / "model.json"
    data = change if isinstance(change, bytes) else json.dumps(change(json.loads(side.read_text()))).encode()
    side.write_bytes(data)


@pytest.mark.parametrize("case,change", TAMPERED, ids=[c for c, _ in TAMPERED])
def test_tampered_sidecar_is_a_clear_error_naming_the_file(export_copy, case, change):
    _tamper(export_copy, change)
    with pytest.raises(SidecarError) as e:
        resolve_backbone(export_copy)
    assert str(export_copy / "model.json") in str(e.value)


@pytest.mark.parametrize("case,change", TAMPERED[:1] + TAMPERED[3:4] + TAMPERED[6:7] + TAMPERED[9:10],
                         ids=["bad JSON", "dim missing", "dim not a number", "preprocess a list"])
def test_cli_with_a_tampered_export_says_which_file(export_copy, tmp_path, case, change):
    _tamper(export_copy, change)
    data = make_image_folder(tmp_path / "data", per_class=1)
    r = CliRunner().invoke(main, ["extract", str(data), "--backbone", str(export_copy), "-q",
                                  "--store", str(tmp_path / "s")])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (r.output, r.exception)
    assert f"error: {export_copy / 'model.json'}" in r.output


def test_graph_swapped_with_its_fingerprint_is_an_error_naming_the_file(export_copy, tmp_path):
    """Both files edited so the fingerprint matches: ONNX Runtime refuses the graph, featx names it."""
    _foreign_onnx(export_copy / "model.onnx", SPEC["input_size"], uint8_in=True)
    meta = json.loads((export_copy / "model.json").read_text())
    meta["preprocess"] = SPEC
    meta["fingerprint"] = fingerprint_of((export_copy / "model.onnx").read_bytes(), load_spec())
    (export_copy / "model.json").write_text(json.dumps(meta))
    data = make_image_folder(tmp_path / "data", per_class=1)
    r = CliRunner().invoke(main, ["extract", str(data), "--backbone", str(export_copy), "-q",
                                  "--store", str(tmp_path / "s"), "--device", "cpu"])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (r.output, r.exception)
    assert f"{export_copy / 'model.onnx'}: ONNX Runtime cannot load this model" in r.output


def load_spec():
    from featx.backbones.cards import Preprocess

    return Preprocess.from_dict(SPEC)


def _foreign_onnx(path: Path, size: int, uint8_in: bool = False) -> Path:
    """A valid ONNX file whose one op (com.evil:FooBar) no runtime has."""
    import onnx
    from onnx import TensorProto, helper

    shape = ["n", size, size, 3] if uint8_in else ["n", 3, size, size]
    x = helper.make_tensor_value_info("pixels" if uint8_in else "x", TensorProto.UINT8 if uint8_in
                                      else TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("embedding" if uint8_in else "y", TensorProto.FLOAT, ["n", 8])
    node = helper.make_node("FooBar", [x.name], [y.name], domain="com.evil")
    model = helper.make_model(helper.make_graph([node], "evil", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.evil", 1)])
    onnx.checker.check_model(model)  # valid ONNX: only running it fails
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("case", ["unknown op", "unknown standard op", "garbage bytes", "empty file",
                                  "spec bad JSON", "spec a list", "spec wrong key"])
def test_user_onnx_that_cannot_work_is_a_clear_error(tmp_path, case):
    from onnx import TensorProto, helper

    path = tmp_path / "mine.onnx"
    spec = json.dumps(SPEC)
    if case == "unknown op":
        _foreign_onnx(path, SPEC["input_size"])
    elif case == "unknown standard op":
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 32, 32])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])
        graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "g", [x], [y])
        path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    elif case == "garbage bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif case == "empty file":
        path.write_bytes(b"")
    else:
        _foreign_onnx(path, SPEC["input_size"])
        spec = {"spec bad JSON": '{"input_size": 32,', "spec a list": "[32, 36]",
                "spec wrong key": json.dumps({**SPEC, "size": 3})}[case]
    (tmp_path / "mine.json").write_text(spec)
    named = tmp_path / ("mine.json" if case.startswith("spec") else "mine.onnx")
    with pytest.raises(FeatXError) as e:
        resolve_backbone(path)
    assert str(named) in str(e.value)
    r = CliRunner().invoke(main, ["export", str(path)])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (r.output, r.exception)
    assert str(named) in r.output


def _small_card(size: int):
    card = get_card("efficientnet_lite0")
    pre = dataclasses.replace(card.preprocess, input_size=size, resize_size=size + size // 8)
    return dataclasses.replace(card, preprocess=pre)


def test_damaged_cached_export_is_exported_again(tmp_path):
    card = _small_card(48)
    first = load_export(export_card(card))
    (first.onnx_path.parent / "model.json").write_text('{"dim": ')
    again = load_export(export_card(card))  # not "unreadable backbone metadata" forever
    assert again.onnx_path == first.onnx_path and again.fingerprint == first.fingerprint
    assert not [p for p in first.onnx_path.parent.parent.iterdir() if p.name.startswith(".")]


def _hidden_dirs(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".") and p.is_dir()] if folder.is_dir() else []


def test_killed_export_leaves_nothing_after_the_next_export(tmp_path, monkeypatch):
    home = tmp_path / "home"
    code = ("import dataclasses; from featx.backbones.cards import get_card; "
            "from featx.backbones.export import export_card; c = get_card('efficientnet_lite0'); "
            "c = dataclasses.replace(c, preprocess=dataclasses.replace(c.preprocess, input_size=40, "
            "resize_size=45)); export_card(c)")
    p = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "FEATX_HOME": str(home)})
    try:
        deadline = time.monotonic() + 300
        while not _hidden_dirs(home / "backbones") and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _hidden_dirs(home / "backbones"), "the export never started building"
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait()
    left = _hidden_dirs(home / "backbones")
    assert left  # what a killed export leaves behind ...
    monkeypatch.setenv("FEATX_HOME", str(home))
    card = _small_card(64)
    bb = load_export(export_card(card))
    assert not _hidden_dirs(home / "backbones")  # ... the next export removes
    assert bb.dim == 1280


def test_clean_stale_builds_knows_dead_from_alive(tmp_path):
    import socket

    host = "".join(c if c.isalnum() or c in "_-" else "_" for c in socket.gethostname())
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    names = {
        "dead": f".exp.{host}-{dead}.abc123_x.featx-tmp",
        "alive": f".exp.{host}-{os.getpid()}.abc123_y.featx-tmp",
        "other_host": f".exp.elsewhere-{dead}.abc123_z.featx-tmp",
        "other_host_old": f".exp.elsewhere-{dead}.abc123_w.featx-tmp",
        "export": "efficientnet_lite0-579344248a93",
    }
    for n in names.values():
        (tmp_path / n).mkdir()
    two_days_ago = time.time() - 2 * 86400
    os.utime(tmp_path / names["other_host_old"], (two_days_ago, two_days_ago))
    assert clean_stale_builds(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        names[k] for k in ("alive", "other_host", "export"))
