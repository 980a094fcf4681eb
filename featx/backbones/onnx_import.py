"""Use a user's own ONNX model as a backbone.

Their graph usually takes normalised float NCHW. We prepend featx's pixel
graph (uint8 NHWC -> cast, transpose, normalise) and, for a feature-map
output, global-average-pool it; the result is an export like any other.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from featx.backbones.artifact import (
    MODEL,
    SIDECAR,
    Sidecar,
    building,
    cached_sidecar,
    fingerprint_of,
)
from featx.backbones.cards import Preprocess
from featx.backbones.export import INPUT_NAME, OUTPUT_NAME
from featx.backbones.zoo import file_sha256
from featx.errors import FeatXError
from featx.paths import exports_dir

SPEC_EXAMPLE = ('{"input_size": 224, "resize_size": 256, "interpolation": "bilinear", '
                '"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}')


def _load_spec(onnx_path: Path, preprocess: Preprocess | None) -> Preprocess:
    """The preprocessing of a user's ONNX file: given, or from the JSON file beside it."""
    if preprocess is not None:
        return preprocess
    side = onnx_path.with_suffix(".json")
    if not side.is_file():
        raise FeatXError(
            f"{onnx_path}: featx needs its preprocessing. Put a JSON file beside it ({side}) like "
            f"{SPEC_EXAMPLE} (mean/std on the 0-255 scale); then every command takes {onnx_path.name} "
            "as --backbone. Or run `featx export FILE.onnx --preprocess SPEC.json` once and pass "
            "the export directory it prints as --backbone."
        )
    try:
        d = json.loads(side.read_text())
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        spec = d.get("preprocess", d)
        if not isinstance(spec, dict):
            raise ValueError(f"'preprocess' must be an object, got {type(spec).__name__}")
        return Preprocess.from_dict(spec)
    except (OSError, UnicodeDecodeError, ValueError, TypeError, FeatXError) as e:
        raise FeatXError(f"{side}: not a preprocessing spec ({e}); expected e.g. {SPEC_EXAMPLE}") from None


def _read_model(onnx_path: Path, size: int):
    """The user's model, checked: valid ONNX, one float NCHW 3-channel input of ``size``, one output."""
    import onnx

    try:
        model = onnx.load(str(onnx_path))
        onnx.checker.check_model(model)
    except Exception as e:
        raise FeatXError(f"{onnx_path}: not a valid ONNX model ({type(e).__name__}: {str(e)[:300]})") from None
    graph_inputs = [i for i in model.graph.input if i.name not in {x.name for x in model.graph.initializer}]
    if len(graph_inputs) != 1 or len(model.graph.output) != 1:
        raise FeatXError(f"{onnx_path}: need exactly one image input and one output")
    inp = graph_inputs[0]
    dims = inp.type.tensor_type.shape.dim
    if len(dims) != 4 or (dims[1].dim_value not in (0, 3)):
        raise FeatXError(f"{onnx_path}: input {inp.name!r} must be float NCHW with 3 channels")
    for i in (2, 3):
        if dims[i].dim_value and dims[i].dim_value != size:
            raise FeatXError(f"{onnx_path}: input is {dims[i].dim_value} px but preprocessing says {size}")
    return model, inp.name


def _pixel_graph(pre: Preprocess, opset: int, ir_version: int):
    """uint8 NHWC ``pixels`` -> normalised float NCHW ``featx_x``."""
    from onnx import TensorProto, helper

    s = pre.input_size
    mean = helper.make_tensor("featx_mean", TensorProto.FLOAT, [1, 3, 1, 1], list(pre.mean))
    std = helper.make_tensor("featx_std", TensorProto.FLOAT, [1, 3, 1, 1], list(pre.std))
    graph = helper.make_graph(
        [
            helper.make_node("Cast", [INPUT_NAME], ["featx_f"], to=TensorProto.FLOAT),
            helper.make_node("Transpose", ["featx_f"], ["featx_t"], perm=[0, 3, 1, 2]),
            helper.make_node("Sub", ["featx_t", "featx_mean"], ["featx_c"]),
            helper.make_node("Div", ["featx_c", "featx_std"], ["featx_x"]),
        ],
        "featx_pixels",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["batch", s, s, 3])],
        [helper.make_tensor_value_info("featx_x", TensorProto.FLOAT, ["batch", 3, s, s])],
        initializer=[mean, std],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def _wrap(onnx_path: Path, model, input_name: str, pre: Preprocess, opset: int):
    """Pixel graph + the user's graph + pooling to one (N, D) ``embedding`` output."""
    import onnx
    from onnx import TensorProto, compose, helper

    merged = compose.merge_models(_pixel_graph(pre, opset, model.ir_version), model,
                                  io_map=[("featx_x", input_name)], prefix2="user_")
    out = merged.graph.output[0]
    rank = len(out.type.tensor_type.shape.dim)
    if rank == 4:  # feature map: pool it to an embedding
        merged.graph.node.extend([
            helper.make_node("GlobalAveragePool", [out.name], ["featx_pooled"]),
            helper.make_node("Flatten", ["featx_pooled"], [OUTPUT_NAME], axis=1),
        ])
    elif rank == 2:
        merged.graph.node.append(helper.make_node("Identity", [out.name], [OUTPUT_NAME]))
    else:
        raise FeatXError(f"{onnx_path}: output must be (N, D) or (N, C, H, W), got rank {rank}")
    del merged.graph.output[:]
    merged.graph.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", None]))
    onnx.checker.check_model(merged)
    return merged


def _probe_dim(onnx_path: Path, data: bytes, size: int) -> int:
    """The embedding width, from one run in ONNX Runtime (which also proves it can run the graph)."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        out = sess.run(None, {INPUT_NAME: np.zeros((2, size, size, 3), np.uint8)})[0]
    except Exception as e:  # an op ONNX Runtime lacks, a custom domain, shapes that do not hold
        raise FeatXError(f"{onnx_path}: ONNX Runtime cannot run this model "
                         f"({type(e).__name__}: {str(e)[:300]})") from None
    if out.ndim != 2 or out.shape[0] != 2 or out.shape[1] < 1:
        raise FeatXError(f"{onnx_path}: expected one embedding per image, got output shape {out.shape}")
    return int(out.shape[1])


def import_onnx(onnx_path: str | os.PathLike, preprocess: Preprocess | None = None) -> Path:
    """Wrap a float-NCHW ONNX model for uint8 pixels; returns a cached export directory."""
    onnx_path = Path(onnx_path)
    pre = _load_spec(onnx_path, preprocess)
    try:
        sha = file_sha256(onnx_path)
    except OSError as e:
        raise FeatXError(f"{onnx_path}: cannot read it ({e.strerror or e})") from None
    dest = exports_dir() / f"user-{onnx_path.stem}-{sha[:12]}-{fingerprint_of(b'', pre)[:6]}"
    cached = cached_sidecar(dest)
    if cached is not None and cached.source_sha256 == sha:
        return dest
    model, input_name = _read_model(onnx_path, pre.input_size)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise FeatXError(f"{onnx_path}: the model imports no standard ONNX opset")
    data = _wrap(onnx_path, model, input_name, pre, opset).SerializeToString()
    dim = _probe_dim(onnx_path, data, pre.input_size)
    side = Sidecar(name=onnx_path.stem, dim=dim, preprocess=pre, fingerprint=fingerprint_of(data, pre),
                   input_name=INPUT_NAME, output_name=OUTPUT_NAME, export_format=1, opset=opset,
                   source=str(onnx_path.resolve()), source_sha256=sha)
    with building(dest) as tmp:
        (tmp / MODEL).write_bytes(data)
        side.write(tmp / SIDECAR)
    return dest
