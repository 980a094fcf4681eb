"""Count the floating-point operations of an ONNX backbone per image (convs and matmuls)."""

from __future__ import annotations

import os

import numpy as np


def count_flops(onnx_path: str | os.PathLike) -> int:
    """FLOPs (2 x multiply-adds) of Conv/Gemm/MatMul nodes for one image.

    Elementwise ops are left out: they are a few percent for CNNs and not
    what a matrix-multiply ceiling bounds.
    """
    import tempfile

    import onnx
    import onnxruntime as ort
    from onnx import shape_inference

    model = onnx.load(str(onnx_path))
    for v in list(model.graph.input) + list(model.graph.output):
        d = v.type.tensor_type.shape.dim
        if d and not d[0].dim_value:
            d[0].dim_value = 1  # one image
    # ORT's constant folding resolves shape arithmetic (e.g. TF "same" padding) to constants
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = os.path.join(tmp, "folded.onnx")
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        model = onnx.load(so.optimized_model_filepath)
    model = shape_inference.infer_shapes(model, data_prop=True)
    shapes = {}
    for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        shapes[v.name] = [d.dim_value for d in v.type.tensor_type.shape.dim]
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    total = 0
    for n in model.graph.node:
        if n.op_type == "Conv":
            w = inits.get(n.input[1]) or shapes.get(n.input[1])
            out = shapes.get(n.output[0])
            if not w or not out or 0 in out:
                continue
            # weight (Cout, Cin/groups, kh, kw); output (1, Cout, H, W)
            total += 2 * int(np.prod(w)) * out[2] * out[3]
        elif n.op_type in ("Gemm", "MatMul"):
            w = inits.get(n.input[1]) or shapes.get(n.input[1])
            a = shapes.get(n.input[0])
            if w and a:
                total += 2 * int(np.prod(a[:-1])) * int(np.prod(w))
    return total
