"""Feature recipes (issue 13): the ``multi`` export on real weights and photos, its recipe per
card family, and ``last`` staying exactly what it was."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from featx.backbones.cards import get_card
from featx.backbones.export import export_card, parity_images
from featx.backbones.features import GRID, make_recipe, multi_features
from featx.backbones.resolve import resolve_backbone
from featx.backbones.zoo import build
from featx.embed.runtime import Encoder
from featx.errors import FeatXError

from .test_export import default_fingerprints


@pytest.fixture(scope="session")
def lite0_multi(featx_home):
    return resolve_backbone("efficientnet_lite0", features="multi")


def test_last_export_is_unchanged(lite0):
    """``last`` (the default) is byte-for-byte the export from before recipes (pinned in
    test_export.py), so every store stays valid."""
    assert lite0.fingerprint in default_fingerprints()
    assert "features" not in lite0.meta
    assert resolve_backbone("efficientnet_lite0", features="last").fingerprint == lite0.fingerprint


def test_multi_export_dim_parity_and_sidecar(lite0, lite0_multi):
    bb = lite0_multi
    assert bb.dim == 4880 and bb.name == "efficientnet_lite0-multi"
    assert bb.onnx_path.parent.name.endswith("-multi")
    assert bb.onnx_path.parent != lite0.onnx_path.parent
    assert bb.sidecar.parity.max_rel_diff <= 1e-4 and bb.sidecar.parity.min_cosine >= 0.999
    rec = bb.meta["features"]
    assert rec["name"] == "multi" and rec["dim"] == 4880
    segs = rec["segments"]
    # every stage (timm blocks 0-6: 16+24+40+80+112+192+320 = 784), 2x2 of the last four, then last
    assert [s["module"] for s in segs if s["grid"] == 1][:7] == [f"blocks.{i}" for i in range(7)]
    assert sum(s["stop"] - s["start"] for s in segs if s["grid"] == 1) == 784 + 1280
    assert [s["module"] for s in segs if s["grid"] == GRID] == ["blocks.3", "blocks.4", "blocks.5", "blocks.6"]
    assert sum(s["stop"] - s["start"] for s in segs if s["grid"] == GRID) == 2816
    assert [s["start"] for s in segs[1:]] == [s["stop"] for s in segs[:-1]]  # contiguous
    inp = onnx.load(str(bb.onnx_path)).graph.input[0].type.tensor_type
    assert inp.elem_type == onnx.TensorProto.UINT8  # still uint8 NHWC in, one output
    assert len(onnx.load(str(bb.onnx_path)).graph.output) == 1


def test_multi_matches_torch_pooling_of_the_stages(lite0, lite0_multi):
    """The ONNX vector equals timm's stage outputs pooled by torch's own adaptive pooling, and
    its last segment is the ``last`` embedding."""
    import torch.nn.functional as F

    card = get_card("efficientnet_lite0")
    model, _, _ = build(card)
    x = parity_images(card.preprocess, n=3)
    maps = {}
    hooks = [model.blocks[i].register_forward_hook(lambda _m, _a, o, i=i: maps.__setitem__(i, o))
             for i in range(7)]
    with torch.no_grad():
        t = (torch.from_numpy(x).permute(0, 3, 1, 2).float() - 127.0) / 128.0
        last = model(t)
        ref = torch.cat([maps[i].mean((2, 3)) for i in range(7)]
                        + [F.adaptive_avg_pool2d(maps[i], GRID).flatten(1) for i in range(3, 7)] + [last], 1)
    for h in hooks:
        h.remove()
    got = Encoder(lite0_multi, device="cpu")(x)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(got[:, -1280:], Encoder(lite0, device="cpu")(x), rtol=1e-4, atol=1e-4)


def test_multi_fingerprint_differs_from_last_and_is_stable(lite0, lite0_multi):
    assert lite0_multi.fingerprint != lite0.fingerprint
    assert resolve_backbone("efficientnet_lite0", features="multi").fingerprint == lite0_multi.fingerprint
    before = lite0_multi.onnx_path.read_bytes()
    again = export_card(get_card("efficientnet_lite0"), force=True, features="multi")
    assert (again / "model.onnx").read_bytes() == before
    assert resolve_backbone(again).fingerprint == lite0_multi.fingerprint


@pytest.mark.parametrize("name, stages, dim", [
    ("resnet18", ["layer1", "layer2", "layer3", "layer4"], 960 + 4 * 960 + 512),
    ("efficientnet_b0", [f"features.{i}" for i in range(1, 8)], 784 + 4 * 704 + 1280),
    # one stage per run of equal shapes; features.16 (the 960-channel head conv) is the last layer
    ("mobilenet_v3_large", [f"features.{i}" for i in (1, 3, 6, 10, 12, 15)], 432 + 4 * 392 + 960),
    ("convnext_tiny", ["features.1", "features.3", "features.5", "features.7"], 1440 + 4 * 1440 + 768),
])
def test_recipe_per_torchvision_family(name, stages, dim):
    card = get_card(name)
    model, _, _ = build(card, pretrained=False)
    recipe = make_recipe(model, card)
    assert list(recipe.stages) == stages
    assert recipe.dim == dim


def test_multi_module_on_a_torchvision_card_matches_its_embedding():
    """resnet18 (random init, no download): the multi module's last segment is the plain backbone."""
    card = get_card("resnet18")
    model, _, _ = build(card, pretrained=False)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        plain = model(x)
        module, recipe = multi_features(model, card)
        out = module(x)
    assert out.shape == (2, recipe.dim)
    torch.testing.assert_close(out[:, -512:], plain)


def test_features_for_a_finished_export_must_match(lite0, lite0_multi):
    with pytest.raises(FeatXError, match="gives 'last' features, not 'multi'"):
        resolve_backbone(lite0.onnx_path.parent, features="multi")
    assert resolve_backbone(lite0_multi.onnx_path.parent, features="multi").dim == 4880
    with pytest.raises(FeatXError, match="not one of last, multi"):
        resolve_backbone("efficientnet_lite0", features="middle")


# ---------------------------------------------------------------- crop, and the option everywhere

def test_crop_none_is_recorded_only_when_asked():
    from featx.backbones.cards import Preprocess

    default = Preprocess()
    assert "crop" not in default.canonical()  # fingerprints from before crop existed stay the same
    assert Preprocess.from_dict(default.to_dict()) == default
    whole = Preprocess(crop="none")
    assert '"crop":"none"' in whole.canonical() and Preprocess.from_dict(whole.to_dict()) == whole
    with pytest.raises(FeatXError, match="crop 'corner' is not one of center, none"):
        Preprocess(crop="corner")


def test_crop_none_resizes_the_whole_image():
    import skimage.data
    from PIL import Image

    from featx.backbones.cards import Preprocess
    from featx.embed.images import load_image

    cat = skimage.data.chelsea()  # 300 x 451: a centre crop cuts off the sides
    pre = Preprocess(interpolation="bicubic", crop="none")
    got = load_image(cat, pre)
    want = np.asarray(Image.fromarray(cat).resize((224, 224), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, load_image(cat, Preprocess(interpolation="bicubic")))


def test_export_crop_none_is_the_same_graph_under_another_fingerprint(lite0):
    from click.testing import CliRunner

    from featx.cli import main

    r = CliRunner().invoke(main, ["export", "efficientnet_lite0", "--features", "last", "--crop", "none", "--json"])
    assert r.exit_code == 0, r.output
    import json

    s = json.loads(r.output)
    whole = resolve_backbone(s["onnx"].rsplit("/", 1)[0])
    assert whole.onnx_path.parent.name == lite0.onnx_path.parent.name + "-crop-none"
    assert whole.preprocess.crop == "none" and s["preprocess"]["crop"] == "none"
    assert whole.onnx_path.read_bytes() == lite0.onnx_path.read_bytes()
    assert whole.fingerprint == s["fingerprint"] != lite0.fingerprint
    assert resolve_backbone("efficientnet_lite0", crop="none").fingerprint == whole.fingerprint
    with pytest.raises(FeatXError, match="made with crop 'center', not 'none'"):
        resolve_backbone(lite0.onnx_path.parent, crop="none")


def test_cli_extract_multi_then_fit_head_and_predict(lite0_multi, image_folder, tmp_path):
    """--features on extract; fit-head and predict find the multi backbone through the table/head."""
    import json

    from click.testing import CliRunner

    from featx.cli import main
    from featx.embed.table import read_table

    table = tmp_path / "t.parquet"
    r = CliRunner().invoke(main, ["extract", str(image_folder), "--features", "multi", "--out", str(table),
                                  "-q", "--json"])
    assert r.exit_code == 0, r.output
    t = read_table(table)
    assert t.X.shape == (8, 4880) and t.fingerprint == lite0_multi.fingerprint
    head = tmp_path / "head.featx"
    r = CliRunner().invoke(main, ["fit-head", "-e", str(table), "--C", "1.0", "--out", str(head), "--json"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["predict", str(head), str(image_folder), "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)["predictions"]
    assert len(rows) == 8 and all(row["label"] == row["path"].split("/")[-2] for row in rows)


def test_estimators_features_multi(lite0_multi, image_folder, tmp_path):
    from sklearn.base import clone

    from featx import FeatXClassifier, FeatXEmbedder
    from featx.heads.headfile import load_head

    paths = sorted(str(p) for p in image_folder.rglob("*.*"))
    y = [p.split("/")[-2] for p in paths]
    emb = FeatXEmbedder(features="multi")
    E = emb.transform(paths)
    assert E.shape == (8, 4880) and len(emb.get_feature_names_out()) == 4880
    np.testing.assert_allclose(E[:, -1280:], FeatXEmbedder(features="last").transform(paths), rtol=1e-4, atol=1e-4)
    assert clone(emb).get_params()["features"] == "multi"
    clf = FeatXClassifier(features="multi", C=1.0).fit(paths, y)
    assert clf.backbone_fingerprint_ == lite0_multi.fingerprint
    assert (clf.predict(paths) == np.asarray(y)).all()
    h = load_head(clf.save_head(tmp_path / "h.joblib"))
    assert h.fingerprint == lite0_multi.fingerprint
    with pytest.raises(FeatXError, match="features= and crop= are for frozen heads"):
        FeatXClassifier(features="multi", finetune=True).fit(paths, y)


# ---------------------------------------------------------------- compare --backbones/--features

def test_cli_compare_features_rows_and_recommendation(lite0, lite0_multi, image_folder, tmp_path):
    import json

    from click.testing import CliRunner

    from featx.cli import main
    from tests.conftest import make_image_folder

    test = make_image_folder(tmp_path / "test", per_class=2)
    out = tmp_path / "report"
    r = CliRunner().invoke(main, ["compare", str(image_folder), "--test", str(test), "--features", "last,multi",
                                  "--out", str(out), "-q", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    rows = s["rows"]
    assert [(x["backbone"], x["features"], x["crop"]) for x in rows] == [
        ("efficientnet_lite0", "last", "center"), ("efficientnet_lite0", "multi", "center")]
    assert [x["dim"] for x in rows] == [1280, 4880]
    assert [x["fingerprint"] for x in rows] == [lite0.fingerprint, lite0_multi.fingerprint]
    for x in rows:
        assert 0.0 <= x["cv_accuracy"] <= 1.0 and x["test_accuracy"] is not None and x["extract_ms_per_image"] > 0
    report = (out / "features.md").read_text()
    best = s["config"]["best"]
    assert f"**Use {best['backbone']} with {best['features']} features" in report
    assert f"featx extract {image_folder} --backbone efficientnet_lite0" in report
    assert (out / "features.png").stat().st_size > 0 and not (out / "compare.md").exists()  # features alone


def test_compare_features_reuses_the_cache(lite0, image_folder, tmp_path):
    from featx.compare_features import compare_features
    from featx.embed.store import EmbeddingStore

    store = tmp_path / "store"
    first = compare_features(image_folder, features="last", out=tmp_path / "a", store=store)
    assert first.rows[0]["embedded_now"] == 8 and len(EmbeddingStore(lite0, store).keys()) == 8
    again = compare_features(image_folder, features="last", out=tmp_path / "b", store=store)
    assert again.rows[0]["embedded_now"] == 0 and again.rows[0]["extract_ms_per_image"] > 0
    with pytest.raises(FeatXError, match="--features: middle; expected a comma-separated list of last, multi"):
        compare_features(image_folder, features="last,middle", out=tmp_path / "c")


def test_recommend_prefers_the_faster_of_a_tie():
    from featx.compare_features import recommend

    rows = [{"cv_accuracy": 0.9, "extract_ms_per_image": 20.0, "dim": 4880},
            {"cv_accuracy": 0.9005, "extract_ms_per_image": 10.0, "dim": 1280},
            {"cv_accuracy": 0.85, "extract_ms_per_image": 5.0, "dim": 512}]
    assert recommend(rows) is rows[1]
    rows[0]["cv_accuracy"] = 0.95
    assert recommend(rows) is rows[0]


def test_recipe_of_timm_models_from_feature_info():
    """timm:NAME (random init, offline): stages from feature_info; transformer tokens are refused."""
    card = get_card("timm:resnet18.a1_in1k")
    model, _, _ = build(card, pretrained=False)
    recipe = make_recipe(model, card)
    assert list(recipe.stages) == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert recipe.dim == (64 + 64 + 128 + 256 + 512) + 4 * (64 + 128 + 256 + 512) + 512
    vit = get_card("timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k")
    with pytest.raises(FeatXError, match="square NCHW feature maps"):
        make_recipe(build(vit, pretrained=False)[0], vit)
