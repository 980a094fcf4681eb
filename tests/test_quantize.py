"""int8 export: calibrated on real images, guarded, usable as a backbone, refused when damaging."""

import numpy as np
import pytest
from click.testing import CliRunner

from featx.backbones.quantize import QuantizationRefused, quantize_backbone
from featx.cli import main
from featx.datasets import (
    FASHION_MNIST_CLASSES,
    fashion_mnist,
    write_image_folder,
)
from featx.embed.images import load_image
from featx.embed.runtime import Encoder
from featx.embed.scan import scan
from featx.extract import extract
from featx.sampling import per_class_subset

from .helpers import needs_fashion_mnist

pytestmark = needs_fashion_mnist


# README/docs: int8 keeps a mean cosine of 0.98 to fp32 (two decimals: >= 0.975) where the int8
# kernels compute exactly (VNNI x86, ARM); where they saturate (x86 AVX2 without VNNI) featx picks
# 7-bit weights, 0.96 (>= 0.955). Measured on this test's data: 8-bit computed exactly 0.9796,
# 7-bit fused on an AVX2 EPYC 0.9573 (the 8-bit weights fused there: 0.84). 100 calibration
# images: the 40 this test used before were too few to show it.
DOCS_COSINE = {8: 0.975, 7: 0.955}
PER_CLASS, CALIB, GUARD = 20, 100, 100


@pytest.fixture(scope="module")
def fmnist_folder(tmp_path_factory):
    x, y = fashion_mnist("test")
    idx = per_class_subset(y, PER_CLASS, seed=1)
    return write_image_folder(tmp_path_factory.mktemp("fm") / "data", x[idx], y[idx], FASHION_MNIST_CLASSES)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_int8_export_guard_and_use(lite0, fmnist_folder, tmp_path):
    q = quantize_backbone(lite0, fmnist_folder, calib_images=CALIB, guard_images=GUARD, force=True)
    meta = q.sidecar.quantization
    assert q.fingerprint != lite0.fingerprint and meta.base_fingerprint == lite0.fingerprint
    g = meta.guard
    assert g.images == GUARD and g.cosine_min <= g.cosine_mean <= 1.0001
    assert g.probe_accuracy_fp32 is not None and g.loss_points is not None
    # the kernels this CPU runs agree with the exact int8 computation (no saturation left)
    assert meta.weight_bits in (7, 8) and meta.kernel_cosine >= 0.99
    assert g.cosine_mean >= DOCS_COSINE[meta.weight_bits], (meta.weight_bits, g)
    import onnx

    model = onnx.load(str(q.onnx_path))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    if meta.weight_bits == 7:  # 7-bit weights everywhere but the depthwise convs (they cannot saturate)
        from onnx import numpy_helper

        spans = sorted(int(np.abs(numpy_helper.to_array(i)).max()) for i in model.graph.initializer
                       if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4)
        assert spans[0] <= 64 and spans[-1] == 127, spans
    # the int8 directory is a backbone like any other
    r = extract(fmnist_folder, q.onnx_path.parent, out=tmp_path / "q.parquet", store=tmp_path / "s",
                device="cpu")
    f = extract(fmnist_folder, lite0, out=tmp_path / "f.parquet", store=tmp_path / "s", device="cpu")
    assert r.table.keys == f.table.keys and r.stats.embedded == len(r.table)  # separate namespace
    assert _cosines(r.table.X, f.table.X).mean() >= DOCS_COSINE[meta.weight_bits]


def test_int8_model_itself_keeps_the_documented_cosine(lite0, fmnist_folder):
    """8-bit weights, computed exactly (ONNX Runtime without its fused int8 kernels): 0.98 on any CPU."""
    import onnxruntime as ort

    q = quantize_backbone(lite0, fmnist_folder, calib_images=CALIB, guard_images=GUARD, force=True,
                          weight_bits=8)
    assert q.sidecar.quantization.weight_bits == 8
    pixels = np.stack([load_image(fmnist_folder / it.path, lite0.preprocess) for it in scan(fmnist_folder).items])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    exact = ort.InferenceSession(str(q.onnx_path), so, providers=["CPUExecutionProvider"])
    got = np.concatenate([exact.run(None, {"pixels": pixels[i:i + 8]})[0] for i in range(0, len(pixels), 8)])
    assert _cosines(got, Encoder(lite0, device="cpu")(pixels)).mean() >= DOCS_COSINE[8]


def test_guard_refuses(lite0, fmnist_folder):
    with pytest.raises(QuantizationRefused, match="damages the embeddings"):
        quantize_backbone(lite0, fmnist_folder, calib_images=20, guard_images=60, max_loss=-100)


def test_cli_quantize_needs_calibration():
    r = CliRunner().invoke(main, ["export", "efficientnet_lite0", "--quantize", "int8"])
    assert r.exit_code == 2 and "--calibrate" in r.output
