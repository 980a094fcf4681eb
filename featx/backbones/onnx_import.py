"""Use a user's own ONNX model as a backbone.

Their graph usually takes normalised float NCHW. We prepend featx's pixel
graph (uint8 NHWC -> cast, transpose, normalise) and, for a feature-map
output, global-average-pool it; the result is an export like any other.

``features="multi"`` also pools named intermediate tensors of their graph (or,
unnamed, the last 4-D map at each spatial size) with the cards' recipe
(featx.backbones.features.layer_recipe), concatenated inside the graph.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
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
from featx.backbones.cards.weights import file_sha256
from featx.backbones.export import INPUT_NAME, OUTPUT_NAME
from featx.backbones.features import (
    GRID,
    RECIPE_VERSION,
    FeatureRecipe,
    check_features,
    grid_cells,
    layer_recipe,
)
from featx.errors import FeatXError
from featx.paths import exports_dir

log = logging.getLogger(__name__)
PREFIX = "user_"  # merge_models renames the user's tensors with it (theirs cannot clash with featx_*)
AUTO = "auto: the last float NCHW map at each spatial size"  # the sidecar's features.layers_chosen
MIN_MULTI_OPSET = 10  # Slice takes its bounds as inputs from opset 10 on

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


def _wrap(onnx_path: Path, model, input_name: str, pre: Preprocess, opset: int,
          recipe: FeatureRecipe | None = None):
    """Pixel graph + the user's graph + pooling to one (N, D) ``embedding`` output
    (with ``recipe``: the pooled layers, then the pooled output, concatenated)."""
    import onnx
    from onnx import TensorProto, compose, helper

    merged = compose.merge_models(_pixel_graph(pre, opset, model.ir_version), model,
                                  io_map=[("featx_x", input_name)], prefix2=PREFIX)
    out = merged.graph.output[0]
    last = OUTPUT_NAME if recipe is None else "featx_last"
    rank = len(out.type.tensor_type.shape.dim)
    if rank == 4:  # feature map: pool it to an embedding
        merged.graph.node.extend([
            helper.make_node("GlobalAveragePool", [out.name], ["featx_pooled"]),
            helper.make_node("Flatten", ["featx_pooled"], [last], axis=1),
        ])
    elif rank == 2:
        merged.graph.node.append(helper.make_node("Identity", [out.name], [last]))
    else:
        raise FeatXError(f"{onnx_path}: output must be (N, D) or (N, C, H, W), got rank {rank}")
    if recipe is not None:
        parts = _pool_layers(merged.graph, recipe)
        merged.graph.node.append(helper.make_node("Concat", [*parts, last], [OUTPUT_NAME], axis=1))
    del merged.graph.output[:]
    merged.graph.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", None]))
    onnx.checker.check_model(merged)
    return merged


def _pool_layers(graph, recipe: FeatureRecipe) -> list[str]:
    """Add the recipe's pooling of the user's layers to ``graph``; the (N, k) tensors, in order.

    A global average is GlobalAveragePool; a GRID x GRID average slices the windows of
    ``adaptive_avg_pool2d`` (featx.backbones.features.grid_cells, exact for odd sides
    too) and averages each, channel-major like the cards' exports.
    """
    from onnx import TensorProto, helper

    sizes = dict(zip(recipe.stages, recipe.sizes, strict=True))
    consts: set[str] = set()

    def const(values: list[int]) -> str:
        name = "featx_i64_" + "_".join(map(str, values))
        if name not in consts:
            consts.add(name)
            graph.initializer.append(helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
        return name

    parts = []
    for k, seg in enumerate(recipe.segments[:-1]):
        src, tag = PREFIX + seg.module, f"featx_seg{k}"
        if seg.grid == 1:
            graph.node.extend([helper.make_node("GlobalAveragePool", [src], [f"{tag}_gap"]),
                               helper.make_node("Flatten", [f"{tag}_gap"], [tag], axis=1)])
        else:
            cells = grid_cells(sizes[seg.module])
            pooled = []
            for i, (h0, h1) in enumerate(cells):
                for j, (w0, w1) in enumerate(cells):
                    cell = f"{tag}_{i}{j}"
                    graph.node.extend([
                        helper.make_node("Slice", [src, const([h0, w0]), const([h1, w1]), const([2, 3])],
                                         [f"{cell}_slice"]),
                        helper.make_node("GlobalAveragePool", [f"{cell}_slice"], [cell])])
                    pooled.append(cell)
            # (N, C, 1, GRID*GRID) flattened: channel-major, cells row by row (adaptive_avg_pool2d's order)
            graph.node.extend([helper.make_node("Concat", pooled, [f"{tag}_cells"], axis=3),
                               helper.make_node("Flatten", [f"{tag}_cells"], [tag], axis=1)])
        parts.append(tag)
    return parts


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


def import_onnx(onnx_path: str | os.PathLike, preprocess: Preprocess | None = None, features: str = "last",
                layers: Sequence[str] | None = None) -> Path:
    """Wrap a float-NCHW ONNX model for uint8 pixels; returns a cached export directory.

    ``features="multi"`` pools the tensors ``layers`` of the user's graph (4-D float
    NCHW, shallow to deep; None: picked automatically, see ``auto_layers``) into the
    embedding before the model's own pooled output (featx.backbones.features.layer_recipe).
    """
    onnx_path = Path(onnx_path)
    check_features(features)
    if layers is not None and features != "multi":
        raise FeatXError(f"{onnx_path}: layers name the tensors that features='multi' pools; "
                         "add --features multi")
    pre = _load_spec(onnx_path, preprocess)
    try:
        sha = file_sha256(onnx_path)
    except OSError as e:
        raise FeatXError(f"{onnx_path}: cannot read it ({e.strerror or e})") from None
    dest = exports_dir() / (f"user-{onnx_path.stem}-{sha[:12]}-{fingerprint_of(b'', pre)[:6]}"
                            + _variant_suffix(features, layers))
    cached = cached_sidecar(dest)
    if (cached is not None and cached.source_sha256 == sha
            and cached.feature_version == (RECIPE_VERSION if features == "multi" else None)):
        return dest
    model, input_name = _read_model(onnx_path, pre.input_size)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise FeatXError(f"{onnx_path}: the model imports no standard ONNX opset")
    recipe, extra = None, {}
    if features == "multi":
        recipe, extra = _multi_recipe(onnx_path, model, input_name, pre.input_size, opset, layers)
    data = _wrap(onnx_path, model, input_name, pre, opset, recipe).SerializeToString()
    dim = _probe_dim(onnx_path, data, pre.input_size)
    side = Sidecar(name=onnx_path.stem + ("-multi" if recipe else ""), dim=dim, preprocess=pre,
                   fingerprint=fingerprint_of(data, pre), input_name=INPUT_NAME, output_name=OUTPUT_NAME,
                   export_format=1, opset=opset, source=str(onnx_path.resolve()), source_sha256=sha,
                   extra=extra)
    with building(dest) as tmp:
        (tmp / MODEL).write_bytes(data)
        side.write(tmp / SIDECAR)
    return dest


def _variant_suffix(features: str, layers: Sequence[str] | None) -> str:
    """The export directory of a ``multi`` import: one per layer list (``last`` keeps its old name)."""
    if features == "last":
        return ""
    key = json.dumps({"layers": list(layers) if layers is not None else "auto", "version": RECIPE_VERSION})
    return f"-multi-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def _multi_recipe(onnx_path: Path, model, input_name: str, size: int, opset: int,
                  layers: Sequence[str] | None) -> tuple[FeatureRecipe, dict]:
    """The recipe over ``layers`` (or the automatic choice) and what the sidecar records of it."""
    if opset < MIN_MULTI_OPSET:
        raise FeatXError(f"{onnx_path}: features='multi' needs ONNX opset {MIN_MULTI_OPSET} or newer, the "
                         f"model has {opset}; export it again with a newer opset")
    chosen = "given"
    if layers is None:
        layers, chosen = auto_layers(onnx_path, model, input_name, size), AUTO
    shapes = _layer_shapes(onnx_path, model, input_name, size, list(layers))
    out_dim = _output_width(onnx_path, model, input_name, size)
    recipe = layer_recipe(shapes, out_dim)
    log.info("%s: multi features over %s (%s), dim %d", onnx_path, list(shapes), chosen, recipe.dim)
    return recipe, {"features": {**recipe.to_dict(), "layers": list(shapes), "layers_chosen": chosen}}


def _with_input_size(model, input_name: str, size: int):
    """A copy of ``model`` whose image input is (batch, 3, size, size), for shape inference
    (the batch stays what the model says, 1 when it is free)."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inp = next(i for i in m.graph.input if i.name == input_name)
    dims = inp.type.tensor_type.shape.dim
    for d, v in zip(dims, (dims[0].dim_value or 1, 3, size, size), strict=True):
        d.dim_value = v
    return m


def _node_outputs(model) -> list[str]:
    """The tensors the top-level graph's nodes compute, in topological order."""
    return [o for node in model.graph.node for o in node.output if o]


def auto_layers(onnx_path: str | os.PathLike, model, input_name: str, size: int) -> list[str]:
    """The layers ``multi`` pools when none are named: the last float NCHW map of each spatial
    size (at least GRID x GRID, square), in the graph's topological order.

    That is the output of each stage of a CNN that halves its maps stage by stage (and of
    its stem); 1 x 1 tensors (squeeze-excitation, the final pooling) are left out. Shapes
    come from ONNX shape inference at the preprocessing's input size.
    """
    from onnx import TensorProto, shape_inference

    try:
        inferred = shape_inference.infer_shapes(_with_input_size(model, input_name, size), data_prop=True)
    except Exception as e:  # an op without a shape function, inconsistent shapes
        raise FeatXError(f"{onnx_path}: cannot infer its tensor shapes to choose layers "
                         f"({type(e).__name__}: {str(e)[:200]}); name them with --layers A,B,...") from None
    sides: dict[str, int] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.output]:
        t = vi.type.tensor_type
        dims = [d.dim_value for d in t.shape.dim]  # 0: unknown
        if t.elem_type == TensorProto.FLOAT and len(dims) == 4 and dims[1] and dims[2] >= GRID and dims[2] == dims[3]:
            sides[vi.name] = dims[2]
    outputs = _node_outputs(model)
    last_at = {sides[n]: pos for pos, n in enumerate(outputs) if n in sides}
    if not last_at:
        raise FeatXError(f"{onnx_path}: found no float NCHW feature map (4-D, square, at least {GRID}x{GRID}) "
                         "among its tensors' inferred shapes; name the layers with --layers A,B,...")
    return [outputs[pos] for pos in sorted(last_at.values())]


def _layer_shapes(onnx_path: Path, model, input_name: str, size: int,
                  layers: list[str]) -> dict[str, tuple[int, int]]:
    """(channels, side) of each named layer, measured by running the model on one input."""
    if not layers:
        raise FeatXError(f"{onnx_path}: features='multi' needs at least one layer")
    outputs = _node_outputs(model)
    known = set(outputs)
    for n in layers:
        if n not in known:
            step = max(1, len(outputs) // 6)
            raise FeatXError(f"{onnx_path}: layer {n!r} is not a tensor computed by its graph; --layers takes "
                             f"node output names, e.g. {', '.join(outputs[::step][:6])} (netron shows them all)")
    if len(set(layers)) != len(layers):
        raise FeatXError(f"{onnx_path}: a layer is named twice in {layers}")
    values = _run_with_outputs(onnx_path, model, input_name, size, layers)
    shapes = {}
    for n, v in zip(layers, values, strict=True):
        if v.ndim != 4 or v.shape[2] != v.shape[3] or v.dtype != np.float32:
            raise FeatXError(f"{onnx_path}: layer {n!r} is {v.dtype} of shape {tuple(v.shape)}; features='multi' "
                             "pools float32 NCHW feature maps with square H x W (4-D)")
        shapes[n] = (int(v.shape[1]), int(v.shape[2]))
    return shapes


def _output_width(onnx_path: Path, model, input_name: str, size: int) -> int:
    """The width of the model's own pooled output (its channels for a feature map)."""
    (out,) = _run_with_outputs(onnx_path, model, input_name, size, [])
    return int(out.shape[1])


def _run_with_outputs(onnx_path: Path, model, input_name: str, size: int, names: list[str]) -> list:
    """The user's model run on one zero input, giving the tensors ``names`` (none: its own output)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names if n not in have)
    batch = next(i for i in model.graph.input if i.name == input_name).type.tensor_type.shape.dim[0].dim_value or 1
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(names or [model.graph.output[0].name],
                        {input_name: np.zeros((batch, 3, size, size), np.float32)})
    except Exception as e:
        raise FeatXError(f"{onnx_path}: ONNX Runtime cannot run this model "
                         f"({type(e).__name__}: {str(e)[:300]})") from None
