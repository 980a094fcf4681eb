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
from featx.extract import extract
from featx.sampling import per_class_subset

from .helpers import needs_fashion_mnist

pytestmark = needs_fashion_mnist


@pytest.fixture(scope="module")
def fmnist_folder(tmp_path_factory):
    x, y = fashion_mnist("test")
    idx = per_class_subset(y, 12, seed=1)
    return write_image_folder(tmp_path_factory.mktemp("fm") / "data", x[idx], y[idx], FASHION_MNIST_CLASSES)


def test_int8_export_guard_and_use(lite0, fmnist_folder, tmp_path):
    q = quantize_backbone(lite0, fmnist_folder, calib_images=40, guard_images=80, force=True)
    meta = q.meta["quantization"]
    assert q.fingerprint != lite0.fingerprint and meta["base_fingerprint"] == lite0.fingerprint
    g = meta["guard"]
    assert g["images"] == 80 and 0 < g["cosine_mean"] <= 1.0001 and g["cosine_min"] <= g["cosine_mean"]
    assert g["probe_accuracy_fp32"] is not None and g["loss_points"] is not None
    import onnx

    ops = {n.op_type for n in onnx.load(str(q.onnx_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # the int8 directory is a backbone like any other
    r = extract(fmnist_folder, q.onnx_path.parent, out=tmp_path / "q.parquet", store=tmp_path / "s",
                device="cpu")
    f = extract(fmnist_folder, lite0, out=tmp_path / "f.parquet", store=tmp_path / "s", device="cpu")
    assert r.table.keys == f.table.keys and r.stats.embedded == len(r.table)  # separate namespace
    cos = (r.table.X * f.table.X).sum(1) / np.linalg.norm(r.table.X, axis=1) / np.linalg.norm(f.table.X, axis=1)
    assert cos.mean() > 0.5  # the same picture of the images, with quantisation noise


def test_guard_refuses(lite0, fmnist_folder):
    with pytest.raises(QuantizationRefused, match="damages the embeddings"):
        quantize_backbone(lite0, fmnist_folder, calib_images=20, guard_images=60, max_loss=-100)


def test_cli_quantize_needs_calibration():
    r = CliRunner().invoke(main, ["export", "efficientnet_lite0", "--quantize", "int8"])
    assert r.exit_code == 2 and "--calibrate" in r.output
