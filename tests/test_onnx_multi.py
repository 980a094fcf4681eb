"""``multi`` features of a user's own ONNX file: its named (or automatically chosen) intermediate
tensors pooled with the cards' recipe inside the graph (featx.backbones.onnx_import).

The reference is computed outside featx: the user's model run in ONNX Runtime with those
tensors as extra outputs, pooled with torch (mean, adaptive_avg_pool2d).
"""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from featx.backbones.export import parity_images
from featx.backbones.resolve import resolve_backbone
from featx.embed.runtime import Encoder
from featx.errors import FeatXError

from .helpers import make_image_folder

SIZE = 56  # maps of 28, 14, 7 (odd: the 2x2 windows overlap), 7, 4, 2
SPEC = {"input_size": SIZE, "resize_size": 64, "interpolation": "bilinear",
        "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}


class SmallCNN(torch.nn.Module):
    """Six conv stages; ``vector``: ends in a global average and a flatten (an (N, C) output)."""

    def __init__(self, vector: bool) -> None:
        super().__init__()

        def stage(i: int, o: int, stride: int):
            return torch.nn.Sequential(torch.nn.Conv2d(i, o, 3, stride, 1), torch.nn.ReLU())

        self.stem, self.s1, self.s2 = stage(3, 8, 2), stage(8, 12, 2), stage(12, 16, 2)
        self.s3, self.s4, self.s5 = stage(16, 16, 1), stage(16, 20, 2), stage(20, 24, 2)
        self.vector = vector

    def forward(self, x):
        y = self.s5(self.s4(self.s3(self.s2(self.s1(self.stem(x))))))
        return torch.flatten(torch.nn.functional.adaptive_avg_pool2d(y, 1), 1) if self.vector else y


def _export(net, path):
    torch.onnx.export(net, (torch.zeros(1, 3, SIZE, SIZE),), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return path


@pytest.fixture(scope="module", params=["map", "vector"])
def user_cnn(request, tmp_path_factory):
    """(path of mine.onnx with mine.json beside it, {node name: its output tensor})."""
    import onnx

    torch.manual_seed(0)
    net = SmallCNN(vector=request.param == "vector").eval()
    path = _export(net, tmp_path_factory.mktemp(request.param) / "mine.onnx")
    path.with_suffix(".json").write_text(json.dumps(SPEC))
    outs = {n.name: n.output[0] for n in onnx.load(str(path)).graph.node}
    assert request.param == "map" or {"/GlobalAveragePool", "/Flatten"} <= set(outs)  # the tests use them
    return path, outs


def _layers(outs: dict) -> list[str]:
    """Stages at 14, 7 (twice: before and after the ReLU) and 4 px, named by the user."""
    return [outs[n] for n in ("/s1/s1.1/Relu", "/s2/s2.1/Relu", "/s3/s3.0/Conv", "/s4/s4.1/Relu")]


def _reference(path, names: list[str], pixels: np.ndarray) -> np.ndarray:
    """The multi recipe computed outside featx: the user's model in ORT, pooled with torch."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    model = onnx.load(str(path))
    model.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    mean = np.array(SPEC["mean"], np.float32).reshape(1, 3, 1, 1)
    std = np.array(SPEC["std"], np.float32).reshape(1, 3, 1, 1)
    x = (pixels.transpose(0, 3, 1, 2).astype(np.float32) - mean) / std
    out, *maps = (torch.from_numpy(a) for a in sess.run(["y", *names], {"x": x}))
    parts = [m.mean((2, 3)) for m in maps]
    parts += [torch.nn.functional.adaptive_avg_pool2d(m, 2).flatten(1) for m in maps[-4:] if m.shape[2] >= 2]
    parts.append(out.mean((2, 3)) if out.ndim == 4 else out)
    return torch.cat(parts, 1).numpy()


def test_multi_is_the_pooling_of_the_named_layers(user_cnn):
    path, outs = user_cnn
    names = _layers(outs)
    if "/GlobalAveragePool" in outs:  # the vector model: a 1x1 map too, global average only
        names.append(outs["/GlobalAveragePool"])
    bb = resolve_backbone(path, features="multi", layers=names)
    plain = resolve_backbone(path)
    pixels = parity_images(bb.preprocess, n=3)
    emb = Encoder(bb, device="cpu")(pixels)
    ref = _reference(path, names, pixels)
    assert emb.shape == ref.shape == (3, bb.dim)
    np.testing.assert_allclose(emb, ref, rtol=1e-5, atol=1e-5)
    rec = bb.sidecar.features
    assert rec["name"] == "multi" and rec["dim"] == bb.dim and rec["layers"] == names
    assert rec["layers_chosen"] == "given"
    last = rec["segments"][-1]
    assert last["module"] == "<pooled output>" and last["stop"] == bb.dim
    np.testing.assert_allclose(emb[:, last["start"]:], Encoder(plain, device="cpu")(pixels), rtol=1e-6, atol=1e-6)
    grids = [s["module"] for s in rec["segments"] if s["grid"] == 2]
    assert grids == [n for n in names[-4:] if n != outs.get("/GlobalAveragePool")]


def test_multi_layers_chosen_automatically(user_cnn):
    """The last map at each spatial size: stem (28), s1 (14), s3 (7), s4 (4), s5 (2)."""
    path, outs = user_cnn
    bb = resolve_backbone(path, features="multi")
    rec = bb.sidecar.features
    want = [outs[f"/{s}/{s}.1/Relu"] for s in ("stem", "s1", "s3", "s4", "s5")]
    assert rec["layers"] == want and rec["layers_chosen"].startswith("auto")
    pixels = parity_images(bb.preprocess, n=2)
    np.testing.assert_allclose(Encoder(bb, device="cpu")(pixels), _reference(path, want, pixels),
                               rtol=1e-5, atol=1e-5)


def test_multi_fingerprint_differs_from_last_and_is_stable(user_cnn):
    path, outs = user_cnn
    names = _layers(outs)
    plain = resolve_backbone(path)
    first = resolve_backbone(path, features="multi", layers=names)
    assert first.fingerprint != plain.fingerprint and first.onnx_path.parent != plain.onnx_path.parent
    shutil.rmtree(first.onnx_path.parent)  # imported again from scratch: the same graph bytes
    again = resolve_backbone(path, features="multi", layers=names)
    assert again.fingerprint == first.fingerprint
    other = resolve_backbone(path, features="multi", layers=names[:-1])
    assert other.fingerprint != first.fingerprint and other.dim < first.dim
    assert resolve_backbone(path).fingerprint == plain.fingerprint  # `last` is untouched
    # an import's directory gives what it was made with
    assert resolve_backbone(first.onnx_path.parent, features="multi").fingerprint == first.fingerprint


def test_bad_layers_are_a_clear_error(user_cnn, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    path, outs = user_cnn
    with pytest.raises(FeatXError, match="layer 'nope' is not a tensor") as e:
        resolve_backbone(path, features="multi", layers=["nope", *_layers(outs)])
    assert str(path) in str(e.value)
    if "/Flatten" in outs:  # the vector model's (N, C) tensor
        with pytest.raises(FeatXError, match="4-D") as e:
            resolve_backbone(path, features="multi", layers=[outs["/Flatten"]])
        assert str(path) in str(e.value) and repr(outs["/Flatten"]) in str(e.value)
    with pytest.raises(FeatXError, match="named twice"):
        resolve_backbone(path, features="multi", layers=_layers(outs)[:1] * 2)
    with pytest.raises(FeatXError, match="add --features multi"):
        resolve_backbone(path, layers=_layers(outs))
    with pytest.raises(FeatXError, match="your own ONNX file"):
        resolve_backbone("efficientnet_lite0", features="multi", layers=["x"])
    old = tmp_path / "old.onnx"  # opset 9: Slice without inputs; refused, not mis-built
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, SIZE, SIZE])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, SIZE, SIZE])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)]), str(old))
    old.with_suffix(".json").write_text(json.dumps(SPEC))
    with pytest.raises(FeatXError, match="opset 10") as e:
        resolve_backbone(old, features="multi")
    assert str(old) in str(e.value)


def test_extract_real_images_through_a_multi_import(user_cnn, tmp_path):
    from featx.embed.table import read_table
    from featx.extract import extract

    path, _ = user_cnn
    root = make_image_folder(tmp_path / "data", per_class=2)
    r = extract(root, path, out=tmp_path / "t.parquet", features="multi", device="cpu")
    dim = r.backbone.sidecar.features["dim"]
    t = read_table(tmp_path / "t.parquet")
    assert t.X.shape == (4, dim) and np.isfinite(t.X).all()
    assert r.backbone.dim == dim > resolve_backbone(path).dim


def test_cli_export_multi_with_layers(user_cnn, tmp_path):
    path, outs = user_cnn
    bare = shutil.copy(path, tmp_path / "theirs.onnx")  # no JSON beside it: --preprocess gives it
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    names = _layers(outs)
    r = subprocess.run([sys.executable, "-m", "featx.cli", "export", str(bare), "--preprocess", str(spec),
                        "--features", "multi", "--layers", ",".join(names), "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["features"] == "multi" and s["layers"] == names
    bb = resolve_backbone(path, features="multi", layers=names)
    assert s["dim"] == bb.dim and s["fingerprint"] == bb.fingerprint  # the same graph as the Python API
    r = subprocess.run([sys.executable, "-m", "featx.cli", "export", str(bare), "--preprocess", str(spec),
                        "--features", "multi", "--layers", "nope"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "layer 'nope'" in r.stderr and str(bare) in r.stderr
