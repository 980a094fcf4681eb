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

from featx.backbones.artifact import fingerprint_of, read_sidecar
from featx.backbones.cards import Preprocess
from featx.backbones.export import INPUT_NAME, OUTPUT_NAME
from featx.backbones.zoo import file_sha256
from featx.errors import FeatXError
from featx.paths import exports_dir


def _load_spec(onnx_path: Path, preprocess: Preprocess | None) -> Preprocess:
    if preprocess is not None:
        return preprocess
    side = onnx_path.with_suffix(".json")
    if side.is_file():
        d = json.loads(side.read_text())
        return Preprocess.from_dict(d.get("preprocess", d))
    raise FeatXError(
        f"{onnx_path}: featx needs its preprocessing. Put a JSON file beside it "
        f"({side.name}) like {{\"input_size\": 224, \"resize_size\": 256, \"interpolation\": "
        "\"bilinear\", \"mean\": [123.675, 116.28, 103.53], \"std\": [58.395, 57.12, 57.375]} "
        "(mean/std on the 0-255 scale), or pass --preprocess FILE."
    )


def import_onnx(onnx_path: str | os.PathLike, preprocess: Preprocess | None = None) -> Path:
    """Wrap a float-NCHW ONNX model for uint8 pixels; returns a cached export directory."""
    import onnx
    from onnx import TensorProto, compose, helper


    onnx_path = Path(onnx_path)
    pre = _load_spec(onnx_path, preprocess)
    sha = file_sha256(onnx_path)
    dest = exports_dir() / f"user-{onnx_path.stem}-{sha[:12]}-{fingerprint_of(b'', pre)[:6]}"
    if (dest / "model.json").is_file() and read_sidecar(dest / "model.json").get("source_sha256") == sha:
        return dest
    try:
        model = onnx.load(str(onnx_path))
        onnx.checker.check_model(model)
    except Exception as e:
        raise FeatXError(f"{onnx_path}: not a valid ONNX model ({e})") from None
    graph_inputs = [i for i in model.graph.input if i.name not in {x.name for x in model.graph.initializer}]
    if len(graph_inputs) != 1 or len(model.graph.output) != 1:
        raise FeatXError(f"{onnx_path}: need exactly one image input and one output")
    inp = graph_inputs[0]
    dims = inp.type.tensor_type.shape.dim
    if len(dims) != 4 or (dims[1].dim_value not in (0, 3)):
        raise FeatXError(f"{onnx_path}: input {inp.name!r} must be float NCHW with 3 channels")
    s = pre.input_size
    for i in (2, 3):
        if dims[i].dim_value and dims[i].dim_value != s:
            raise FeatXError(f"{onnx_path}: input is {dims[i].dim_value} px but preprocessing says {s}")
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))

    mean = helper.make_tensor("featx_mean", TensorProto.FLOAT, [1, 3, 1, 1], list(pre.mean))
    std = helper.make_tensor("featx_std", TensorProto.FLOAT, [1, 3, 1, 1], list(pre.std))
    pre_graph = helper.make_graph(
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
    pre_model = helper.make_model(pre_graph, opset_imports=[helper.make_opsetid("", opset)])
    pre_model.ir_version = model.ir_version
    merged = compose.merge_models(pre_model, model, io_map=[("featx_x", inp.name)], prefix2="user_")
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

    import onnxruntime as ort

    sess = ort.InferenceSession(merged.SerializeToString(), providers=["CPUExecutionProvider"])
    dim = int(sess.run(None, {INPUT_NAME: np.zeros((2, s, s, 3), np.uint8)})[0].shape[1])
    dest.mkdir(parents=True, exist_ok=True)
    data = merged.SerializeToString()
    tmp = dest / "model.onnx.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, dest / "model.onnx")
    meta = {
        "name": onnx_path.stem, "source": str(onnx_path.resolve()), "source_sha256": sha,
        "featx_export": 1, "preprocess": pre.to_dict(), "dim": dim, "opset": opset,
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC"},
        "output": {"name": OUTPUT_NAME, "dtype": "float32"},
        "fingerprint": fingerprint_of(data, pre),
    }
    (dest / "model.json").write_text(json.dumps(meta, indent=2))
    return dest
