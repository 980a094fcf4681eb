"""Export: real weights, parity with torch, the chelsea sanity check, caching, other sources."""

import json

import numpy as np
import onnx
import pytest
import torch

from featx.backbones.artifact import Sidecar, fingerprint_of, load_export
from featx.backbones.cards import get_card
from featx.backbones.export import export_card, parity_images
from featx.backbones.resolve import resolve_backbone
from featx.backbones.zoo import build
from featx.embed.images import load_image
from featx.embed.runtime import Encoder
from featx.errors import FeatXError, MismatchError

IMAGENET_CATS = {281: "tabby", 282: "tiger cat", 285: "Egyptian cat"}


def test_sidecar_and_parity(lite0):
    meta = lite0.meta
    for k in ("card", "weights_sha256", "preprocess", "dim", "opset", "featx_version", "fingerprint"):
        assert k in meta
    assert meta["parity"]["max_rel_diff"] <= 1e-4
    assert lite0.dim == 1280
    m = onnx.load(str(lite0.onnx_path))
    inp = m.graph.input[0].type.tensor_type
    assert inp.elem_type == onnx.TensorProto.UINT8
    assert inp.shape.dim[0].dim_param  # dynamic batch
    assert [d.dim_value for d in inp.shape.dim[1:]] == [224, 224, 3]


# The default backbone's export is byte-identical from one featx version to the next for the
# same torch, onnx and onnxruntime on the same kind of CPU: its fingerprint names every cached
# embedding and head. The bytes depend on more than featx's code: another onnxruntime (4eaa37b9ecc083d9,
# pinned with the 1.31 line on 2026-11-30, became 266ae1a5c67eeb82 under 1.32.0 with featx's code
# unchanged) or another machine (the same versions on a 2-core AMD EPYC with AVX-512 BF16 give
# 4eaa37b9ecc083d9 again, where a CPU with AVX-512 VNNI and no BF16 gave 266ae1a5c67eeb82) may write
# others; the likely cause is the saved basic-optimised graph, whose constant folding runs ORT's
# CPU kernels. Pins are kept per (torch, onnx,
# onnxruntime), each the set of fingerprints measured at known-good commits; any other value fails.
DEFAULT_FINGERPRINTS = {
    ("2.14.1", "1.23.2", "1.32.0"): {"266ae1a5c67eeb82", "4eaa37b9ecc083d9"},
}


def default_fingerprints() -> set[str]:
    """The pinned fingerprints of the default export for the installed torch/onnx/onnxruntime."""
    import onnxruntime
    import torch

    key = (torch.__version__.split("+")[0], onnx.__version__, onnxruntime.__version__)
    if key not in DEFAULT_FINGERPRINTS:
        pytest.skip(f"no pinned default-export fingerprint for torch/onnx/onnxruntime {key}; export "
                    "with these versions at a featx commit known to be right and add it")
    return DEFAULT_FINGERPRINTS[key]


def test_default_export_fingerprint_is_pinned(lite0):
    pinned = default_fingerprints()
    assert lite0.fingerprint in pinned
    assert fingerprint_of(lite0.onnx_path.read_bytes(), lite0.preprocess) == lite0.fingerprint


def test_sidecar_is_typed_and_round_trips(lite0):
    raw = json.loads((lite0.onnx_path.parent / "model.json").read_text())
    side = Sidecar.read(lite0.onnx_path.parent / "model.json")
    assert side == lite0.sidecar
    assert json.loads(json.dumps(side.to_dict())) == raw == json.loads(json.dumps(lite0.meta))
    assert (side.name, side.dim, side.input_name, side.output_name) == ("efficientnet_lite0", 1280, "pixels",
                                                                         "embedding")
    assert side.precision == "fp32" and side.export_format == 2 and side.card["name"] == "efficientnet_lite0"
    assert side.weights == get_card("efficientnet_lite0").weights and side.parity.images == 4
    assert {"featx_version", "torch_version", "export_seconds"} <= set(side.extra)


def test_export_graph_is_static_plain_convs(lite0):
    """TF SAME padding is frozen and fused: no run-time shape arithmetic, no Pad between convs."""
    ops = [n.op_type for n in onnx.load(str(lite0.onnx_path)).graph.node]
    assert ops.count("Conv") == 49
    assert not {"Pad", "Shape", "Ceil", "Gather", "Concat"} & set(ops), sorted(set(ops))
    assert lite0.meta["featx_export"] == 2


@pytest.mark.parametrize("size", [224, 96, 61])
def test_freeze_same_padding_computes_the_same_function(size):
    from timm.layers.conv2d_same import Conv2dSame

    from featx.backbones.export import make_wrapper
    from featx.backbones.same_pad import freeze_same_padding

    backbone, _, _ = build(get_card("efficientnet_lite0"))
    module = make_wrapper(backbone, get_card("efficientnet_lite0").preprocess)
    frozen = freeze_same_padding(module, size)
    assert any(isinstance(m, Conv2dSame) for m in module.modules())  # the original is untouched
    assert not any(isinstance(m, Conv2dSame) for m in frozen.modules())
    x = torch.from_numpy(np.random.default_rng(size).integers(0, 256, (2, size, size, 3), dtype=np.uint8))
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), module(x), rtol=1e-5, atol=1e-5)


def test_chelsea_is_a_cat(lite0):
    """Proves weights and preprocessing: the ONNX embedding + ImageNet classifier -> a cat."""
    import skimage.data

    _, classifier, _ = build(get_card("efficientnet_lite0"))
    enc = Encoder(lite0, device="cpu")
    x = load_image(skimage.data.chelsea(), lite0.preprocess)[None]
    emb = torch.from_numpy(enc(x))
    with torch.no_grad():
        top3 = classifier(emb).topk(3).indices[0].tolist()
    assert set(top3) == set(IMAGENET_CATS), top3


def test_onnx_matches_torch_any_batch(lite0):
    backbone, _, _ = build(get_card("efficientnet_lite0"))
    from featx.backbones.export import make_wrapper

    module = make_wrapper(backbone, lite0.preprocess)
    x = parity_images(lite0.preprocess, n=3)
    enc = Encoder(lite0, device="cpu")
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(enc(x), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(enc(x[:1]), ref[:1], rtol=1e-4, atol=1e-4)  # batch 1 too


def test_second_export_is_cached(lite0):
    # an export is published by renaming a fresh directory into place, so a second export
    # would give new inodes; the cached one leaves every file of the directory as it was
    d = lite0.onnx_path.parent

    def files():
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in d.iterdir()}

    before = files()
    again = resolve_backbone("efficientnet_lite0")
    assert files() == before and again.onnx_path == lite0.onnx_path
    assert again.fingerprint == lite0.fingerprint


def test_modified_onnx_is_refused(lite0, tmp_path):
    import shutil

    d = tmp_path / "exp"
    shutil.copytree(lite0.onnx_path.parent, d)
    with open(d / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(MismatchError, match="modified after export"):
        load_export(d)


def test_torchvision_card_with_local_checkpoint(tmp_path):
    """The torchvision path, offline: a local checkpoint given as --weights (random init here)."""
    import torchvision

    ckpt = tmp_path / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), ckpt)
    bb = resolve_backbone("resnet18", weights=ckpt)
    assert bb.dim == 512 and bb.meta["parity"]["max_rel_diff"] <= 1e-4
    x = parity_images(bb.preprocess, n=2)
    assert Encoder(bb, device="cpu")(x).shape == (2, 512)
    # a checkpoint of the wrong architecture is refused, naming the file
    bad = tmp_path / "bad.pth"
    torch.save({"foo": torch.zeros(3)}, bad)
    with pytest.raises(FeatXError, match=r"bad\.pth"):
        export_card(get_card("resnet18"), bad)


def test_user_onnx_backbone(tmp_path):
    """A user's own float-NCHW ONNX model with a preprocessing JSON beside it."""
    import torchvision

    net = torchvision.models.resnet18()
    net.fc = torch.nn.Identity()
    net.eval()
    path = tmp_path / "mine.onnx"
    torch.onnx.export(net, (torch.zeros(2, 3, 224, 224),), str(path), dynamo=False,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    with pytest.raises(FeatXError, match="preprocessing") as e:
        resolve_backbone(path)
    # says what works for every command (a JSON beside the file, or export it once), not an
    # option only `featx export` has
    msg = str(e.value)
    assert str(path.with_suffix(".json")) in msg and "featx export FILE.onnx --preprocess" in msg
    assert "or pass --preprocess FILE" not in msg
    spec = {"input_size": 224, "resize_size": 256, "interpolation": "bilinear",
            "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}
    path.with_suffix(".json").write_text(json.dumps(spec))
    bb = resolve_backbone(path)
    assert bb.dim == 512
    x = parity_images(bb.preprocess, n=2)
    mean = np.array(spec["mean"], np.float32).reshape(1, 3, 1, 1)
    std = np.array(spec["std"], np.float32).reshape(1, 3, 1, 1)
    ref = net(torch.from_numpy((x.transpose(0, 3, 1, 2).astype(np.float32) - mean) / std)).detach().numpy()
    np.testing.assert_allclose(Encoder(bb, device="cpu")(x), ref, rtol=1e-4, atol=1e-4)
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    (tmp_path / "junk.json").write_text(json.dumps(spec))
    with pytest.raises(FeatXError, match="not a valid ONNX model"):
        resolve_backbone(tmp_path / "junk.onnx")


def _small_card(size: int = 96):
    import dataclasses

    card = get_card("efficientnet_lite0")
    pre = dataclasses.replace(card.preprocess, input_size=size, resize_size=size + size // 8)
    return dataclasses.replace(card, preprocess=pre)


@pytest.fixture(scope="module")
def fp16_pair():
    card = _small_card()
    return load_export(export_card(card)), load_export(export_card(card, precision="fp16"))


def _cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_fp16_export_is_a_float16_graph_close_to_fp32(fp16_pair):
    b32, b16 = fp16_pair
    assert b16.onnx_path.parent.name.endswith("-fp16")
    # a changed card has its own directory: the stock 224 px export is not replaced
    assert b32.onnx_path.parent != export_card(get_card("efficientnet_lite0"))
    assert "-96px-" in b32.onnx_path.parent.name
    assert b16.meta["precision"] == "fp16" and b32.meta["precision"] == "fp32"
    assert b16.fingerprint != b32.fingerprint
    m = onnx.load(str(b16.onnx_path))
    weights = [i for i in m.graph.initializer if len(i.dims) == 4]
    assert len(weights) == 49 and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # consumers see float32
    assert b16.meta["parity"]["max_rel_diff"] <= 5e-2  # checked against the float32 torch model
    assert b16.meta["parity"]["min_cosine"] >= 0.999
    x = parity_images(b32.preprocess)
    e32, e16 = Encoder(b32, device="cpu")(x), Encoder(b16, device="cpu")(x)
    assert e16.dtype == np.float32
    assert _cosines(e32, e16).min() > 0.999


def test_io_binding_gives_the_same_embeddings(fp16_pair):
    b32, _ = fp16_pair
    x = parity_images(b32.preprocess, n=3)
    bound = Encoder(b32, device="cpu", io_binding=True)
    assert bound._binds()
    np.testing.assert_array_equal(bound(x), Encoder(b32, device="cpu", io_binding=False)(x))


def test_cuda_embeddings_fp32_fp16_and_io_binding(fp16_pair):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu and an NVIDIA GPU")
    b32, b16 = fp16_pair
    x = parity_images(b32.preprocess)
    ref = Encoder(b32, device="cpu")(x)
    gpu = Encoder(b32, device="cuda")
    assert gpu._binds()  # IO binding is the CUDA default
    np.testing.assert_allclose(gpu(x), ref, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(Encoder(b32, device="cuda", io_binding=False)(x), ref, rtol=1e-3, atol=1e-3)
    assert _cosines(Encoder(b16, device="cuda")(x), ref).min() > 0.999


def test_cli_refuses_fp16_with_int8(tmp_path):
    from click.testing import CliRunner

    from featx.cli import main

    r = CliRunner().invoke(main, ["export", "efficientnet_lite0", "--precision", "fp16", "--quantize", "int8",
                                  "--calibrate", str(tmp_path)])
    assert r.exit_code == 2 and "drop --precision" in r.output
