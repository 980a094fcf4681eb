"""Any timm model as a backbone (timm:NAME): preprocessing from timm, export, parity, int8, CLI.

No network here: each test makes its checkpoint with timm (seeded random weights) and
passes it as --weights, the way a user without internet passes a downloaded file.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from featx.backbones.artifact import fingerprint_of, load_export
from featx.backbones.cards import get_card
from featx.backbones.export import parity_images
from featx.backbones.resolve import resolve_backbone
from featx.cli import main
from featx.embed.runtime import Encoder
from featx.embed.table import read_table
from featx.errors import FeatXError, UnknownBackboneError

from .helpers import make_image_folder

timm = pytest.importorskip("timm")

# a CNN and a ViT, small enough to export in seconds
MODELS = ["resnet18.a1_in1k", "vit_tiny_patch16_224.augreg_in21k_ft_in1k"]


def _checkpoint(tmp_path_factory, name: str, headless: bool = False):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **({"num_classes": 0} if headless else {}))
    path = tmp_path_factory.mktemp("ckpt") / f"{name}{'-headless' if headless else ''}.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {name: _checkpoint(tmp_path_factory, name) for name in MODELS}


def _cli(*args: str, ok: bool = True):
    r = CliRunner().invoke(main, list(args))
    if ok:
        assert r.exit_code == 0, (r.output, r.exception)
    return r


@pytest.mark.parametrize("name", MODELS)
def test_preprocessing_comes_from_timms_pretrained_cfg(name):
    card = get_card(f"timm:{name}")
    cfg = timm.data.resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(name).to_dict())
    pre = card.preprocess
    assert card.name == f"timm:{name}" and card.weights_source.kind == "timm"
    assert pre.input_size == cfg["input_size"][1] == cfg["input_size"][2]
    assert pre.resize_size == math.floor(cfg["input_size"][1] / cfg["crop_pct"])  # timm's eval resize
    assert pre.interpolation == cfg["interpolation"]
    np.testing.assert_allclose(pre.mean, np.array(cfg["mean"]) * 255, rtol=1e-6)
    np.testing.assert_allclose(pre.std, np.array(cfg["std"]) * 255, rtol=1e-6)
    headless = timm.create_model(name, pretrained=False, num_classes=0)
    assert card.dim == headless(torch.zeros(1, 3, pre.input_size, pre.input_size)).shape[1]
    assert card.blocks and all(headless.get_submodule(p) is not None for b in card.blocks for p in b)


def test_bare_architecture_resolves_to_timms_default_weight_set():
    assert get_card("timm:resnet18").name == f"timm:resnet18.{timm.models.get_pretrained_cfg('resnet18').tag}"


@pytest.mark.parametrize("name", MODELS)
def test_export_with_local_checkpoint_is_timms_pooled_prelogits(name, checkpoints, tmp_path):
    ckpt = checkpoints[name]
    r = _cli("export", f"timm:{name}", "--weights", str(ckpt), "--json")
    s = json.loads(r.output)
    bb = load_export(os.path.dirname(s["onnx"]))
    assert s["name"] == bb.name == f"timm:{name}" and s["parity"]["max_rel_diff"] <= 1e-4
    assert bb.fingerprint == fingerprint_of(bb.onnx_path.read_bytes(), bb.preprocess)
    assert bb.sidecar.weights == str(ckpt) and bb.sidecar.card["weights"] == f"timm:{name}"
    # the ONNX embedding is timm's own headless model (num_classes=0) on the same pixels
    ref_model = timm.create_model(name, pretrained=False, num_classes=0).eval()
    sd = torch.load(ckpt, weights_only=True)
    head = {k for k in sd if k.startswith(ref_model.pretrained_cfg["classifier"] + ".")}
    ref_model.load_state_dict({k: v for k, v in sd.items() if k not in head})
    x = parity_images(bb.preprocess, n=3)
    mean = torch.tensor(bb.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(bb.preprocess.std).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = ref_model((torch.from_numpy(x).permute(0, 3, 1, 2).float() - mean) / std).numpy()
    got = Encoder(bb, device="cpu")(x)
    assert got.shape == (3, bb.dim)
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)
    # the same name and weights again: the cached export, same fingerprint
    assert resolve_backbone(f"timm:{name}", weights=ckpt).fingerprint == bb.fingerprint


def test_timm_backbone_works_everywhere_a_backbone_is_named(checkpoints, tmp_path):
    data = make_image_folder(tmp_path / "data")
    name, ckpt = MODELS[0], checkpoints[MODELS[0]]
    out = tmp_path / "t.parquet"
    _cli("extract", str(data), "--backbone", f"timm:{name}", "--weights", str(ckpt), "--features", "last",
         "--out", str(out), "--store", str(tmp_path / "s"), "--device", "cpu", "-q")
    t = read_table(out)
    assert t.X.shape == (8, 512) and np.isfinite(t.X).all()
    assert t.fingerprint == resolve_backbone(f"timm:{name}", weights=ckpt).fingerprint
    head = tmp_path / "head.featx"
    _cli("fit-head", "--embeddings", str(out), "--C", "1", "--out", str(head))
    r = _cli("predict", str(head), str(data), "--out", str(tmp_path / "p.csv"))
    assert (tmp_path / "p.csv").read_text().count("\n") == 9, r.output


def test_int8_of_a_timm_backbone(checkpoints, tmp_path):
    from featx.backbones.quantize import quantize_backbone

    fp32 = resolve_backbone(f"timm:{MODELS[0]}", weights=checkpoints[MODELS[0]])
    data = make_image_folder(tmp_path / "data", per_class=8)
    q = quantize_backbone(fp32, data, calib_images=8, guard_images=8, force=True)
    assert q.name == f"timm:{MODELS[0]}-int8" and q.fingerprint != fp32.fingerprint
    assert q.sidecar.quantization.base_fingerprint == fp32.fingerprint
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in onnx.load(str(q.onnx_path)).graph.node}
    x = parity_images(q.preprocess, n=2)
    assert Encoder(q, device="cpu")(x).shape == (2, 512)
    assert load_export(q.onnx_path.parent).fingerprint == q.fingerprint


def test_headless_checkpoint_loads_and_a_wrong_one_is_refused(tmp_path_factory, checkpoints):
    from featx.backbones.export import export_card

    vit = f"timm:{MODELS[1]}"
    headless = _checkpoint(tmp_path_factory, MODELS[1], headless=True)
    assert load_export(export_card(get_card(vit), headless)).dim == 192
    with pytest.raises(FeatXError, match=r"resnet18\.a1_in1k\.pth.*do not fit timm's vit_tiny"):
        export_card(get_card(vit), checkpoints[MODELS[0]])


def test_unknown_and_unsupported_timm_names_say_what_to_do():
    with pytest.raises(UnknownBackboneError, match=r"Did you mean timm:resnet18.*featx models --timm"):
        get_card("timm:resnt18")
    with pytest.raises(UnknownBackboneError, match=r"timm has no model 'resnet18\.no_such_tag'"):
        get_card("timm:resnet18.no_such_tag")
    squash = next(n for n in timm.list_models("convnext_tiny*", pretrained=True)
                  if timm.models.get_pretrained_cfg(n).crop_mode == "squash")
    with pytest.raises(FeatXError, match="crop_mode='squash'"):
        get_card(f"timm:{squash}")


def test_models_timm_lists_timms_pretrained_names():
    rows = json.loads(_cli("models", "--timm", "resnet18*", "--json").output)
    assert [r["name"] for r in rows] == [f"timm:{n}" for n in timm.list_models("resnet18*", pretrained=True)]
    r18 = next(r for r in rows if r["name"] == "timm:resnet18.a1_in1k")
    assert (r18["input_size"], r18["interpolation"], r18["unsupported"]) == (224, "bicubic", "")
    text = _cli("models", "--timm", "convnext_tiny*").output
    assert "timm:convnext_tiny.fb_in22k" in text and "not usable: its preprocessing uses crop_mode='squash'" in text
    # a bare architecture lists its weight sets
    assert {r["name"] for r in json.loads(_cli("models", "--timm", "resnet18", "--json").output)} == \
        {f"timm:{n}" for n in timm.list_models(["resnet18", "resnet18.*"], pretrained=True)}
    assert "timm:NAME" in _cli("models").output


def test_without_weights_and_network_the_error_names_weights(tmp_path):
    """Offline (HF_HUB_OFFLINE, empty hub cache): a clear error that says --weights, no traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "FEATX_HOME": str(tmp_path / "home")}
    p = subprocess.run([sys.executable, "-m", "featx.cli", "export", "timm:resnet18.a1_in1k"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 1, p.stderr
    assert "could not get the published weights of 'timm:resnet18.a1_in1k'" in p.stderr
    assert "--weights PATH" in p.stderr and "Traceback" not in p.stderr


def test_finetune_starts_from_a_timm_backbone(checkpoints, tmp_path):
    """The card's stages (from timm's feature_info) unfreeze; the run exports a backbone like any other."""
    data = make_image_folder(tmp_path / "data", per_class=6)
    run = tmp_path / "run"
    _cli("finetune", str(data), "--backbone", f"timm:{MODELS[0]}", "--weights", str(checkpoints[MODELS[0]]),
         "--epochs", "1", "--input-size", "64", "--batch-size", "4", "--workers", "0", "--out", str(run))
    bb = resolve_backbone(run)
    assert bb.dim == 512 and bb.preprocess.input_size == 64
    assert bb.sidecar.card["name"] == f"timm:{MODELS[0]}" and bb.sidecar.parity.max_rel_diff <= 1e-4
