"""torch -> ONNX export of a backbone: uint8 NHWC in, pooled embedding out.

Normalisation and the NHWC->NCHW transpose live inside the graph, so the
ONNX file and its sidecar are all any consumer needs. Exports are cached by
(card, weights, export format) and parity-checked against torch on real photos.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import numpy as np

from featx import __version__
from featx.backbones.artifact import (
    MODEL,
    SIDECAR,
    Parity,
    Sidecar,
    building,
    cached_sidecar,
    fingerprint_of,
    safe_dirname,
)
from featx.backbones.cards import BackboneCard, Preprocess
from featx.backbones.features import (
    RECIPE_VERSION,
    check_features,
    multi_features,
)
from featx.errors import ExportError, require
from featx.paths import exports_dir

log = logging.getLogger(__name__)

EXPORT_FORMAT = 2  # 2: static SAME padding (featx.backbones.same_pad)
OPSET = 17
PARITY_RTOL = 1e-4
FP16_PARITY_RTOL = 5e-2  # float16 against the float32 torch model: a few % on single features ...
PARITY_MIN_COSINE = 0.999  # ... while every embedding keeps its direction
PRECISIONS = ("fp32", "fp16")
INPUT_NAME = "pixels"
OUTPUT_NAME = "embedding"


def make_wrapper(backbone, pre: Preprocess):
    """nn.Module: uint8 (N,H,W,3) -> backbone(normalised float NCHW)."""
    torch = require("torch", "torch")

    class PixelsToEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            self.register_buffer("mean", torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1))
            # equal per-channel values are traced as scalars: ONNX Runtime broadcasts a scalar fast,
            # while a (1,3,1,1) operand, once its transpose optimiser moves the Sub/Div to NHWC
            # (int8 graphs), costs a quarter of the int8 inference time
            uniform = len(set(pre.mean)) == 1 and len(set(pre.std)) == 1
            self.scalar = (float(pre.mean[0]), float(pre.std[0])) if uniform else None
            self.compute_dtype = torch.float32  # half_precision() switches it

        def forward(self, x):
            x = x.permute(0, 3, 1, 2).to(self.compute_dtype)
            if self.scalar is not None:
                y = self.backbone((x - self.scalar[0]) / self.scalar[1])
            else:
                y = self.backbone((x - self.mean) / self.std)
            return y.float()  # the embedding stays float32 whatever the compute precision

    return PixelsToEmbedding().eval()


def half_precision(module):
    """A float16 copy of a ``make_wrapper`` module: uint8 in, fp16 compute, float32 embedding out."""
    import copy

    torch = require("torch", "torch")
    half = copy.deepcopy(module).half().eval()
    half.compute_dtype = torch.float16
    return half


def parity_images(pre: Preprocess, n: int = 4) -> np.ndarray:
    """Real photos (scikit-image's bundled set) preprocessed for ``pre``: uint8 (n, s, s, 3)."""
    from featx.embed.images import load_image

    try:
        import skimage.data as sd

        photos = [sd.chelsea(), sd.astronaut(), sd.coffee(), sd.rocket(), sd.camera()][:n]
    except ImportError:  # still real pixels, just fewer of them
        rng = np.random.default_rng(0)
        photos = [rng.integers(0, 256, (300, 400, 3), dtype=np.uint8) for _ in range(n)]
    return np.stack([load_image(p, pre) for p in photos])


def export_module(module, pre: Preprocess, dest: str | os.PathLike, output_name: str = OUTPUT_NAME,
                  optimize: bool = True) -> None:
    """Trace ``module`` (uint8 NHWC -> one output) to ONNX with a dynamic batch axis.

    With ``optimize`` the traced graph then goes through ONNX Runtime's basic
    (portable, standard-ops-only) optimisation: constant folding and
    Pad-into-Conv fusion leave a graph of plain convs that every runtime and
    the int8 quantiser see the same way. Not for float16 graphs: the CPU
    provider would bake in Casts to float32 around each op it lacks.
    """
    torch = require("torch", "torch")
    import onnxruntime as ort

    from featx.backbones.same_pad import freeze_same_padding

    s = pre.input_size
    module = freeze_same_padding(module, s)
    dummy = torch.zeros(2, s, s, 3, dtype=torch.uint8)  # batch >= 2 so nothing specialises on 1
    import warnings

    traced = Path(dest).with_name(f".{Path(dest).name}.traced")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the TorchScript exporter is deprecated but gives a smaller, faster graph for CNNs
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)  # constant-folding notes about Slice steps
            # shape checks (timm's ViT asserts the input size) trace as constants: right for a
            # graph of one input size, which every export is
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                module, (dummy,), str(traced), dynamo=False, opset_version=OPSET,
                input_names=[INPUT_NAME], output_names=[output_name],
                dynamic_axes={INPUT_NAME: {0: "batch"}, output_name: {0: "batch"}},
                do_constant_folding=True,
            )
        if not optimize:
            os.replace(traced, dest)
            return
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(dest)
        so.log_severity_level = 3
        ort.InferenceSession(str(traced), so, providers=["CPUExecutionProvider"])
        _keep_used_opsets(dest)
    finally:
        traced.unlink(missing_ok=True)


def _keep_used_opsets(path: str | os.PathLike) -> None:
    """Drop the opset imports ONNX Runtime adds for every domain it knows; merging graphs
    (featx.heads.onnx_classifier) refuses models whose imports differ."""
    import onnx

    m = onnx.load(str(path))
    used = {n.domain for n in m.graph.node} | {""}
    kept = [o for o in m.opset_import if o.domain in used]
    del m.opset_import[:]
    m.opset_import.extend(kept)
    onnx.save(m, str(path))


def check_parity(module, onnx_path: str | os.PathLike, pre: Preprocess, rtol: float = PARITY_RTOL) -> Parity:
    """Run torch and ONNX Runtime on real photos; raise ExportError above ``rtol``."""
    torch = require("torch", "torch")
    import onnxruntime as ort

    x = parity_images(pre)
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {INPUT_NAME: x})[0]
    max_abs = float(np.abs(got - ref).max())
    rel = max_abs / max(float(np.abs(ref).max()), 1e-12)
    cos = float(((got * ref).sum(1) / np.maximum(np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1),
                                                  1e-12)).min())
    if not (rel <= rtol and cos >= PARITY_MIN_COSINE):
        raise ExportError(f"ONNX and torch disagree: max abs diff {max_abs:.3g} (relative {rel:.3g}, "
                          f"limit {rtol}), min cosine {cos:.5f} (limit {PARITY_MIN_COSINE})")
    return Parity(images=len(x), max_abs_diff=max_abs, max_rel_diff=rel, min_cosine=cos)


def export_dir_for(card: BackboneCard, weights_sha: str) -> Path:
    """Where a card's export is cached. A card changed from the registered one (another input
    size, for fine-tuning or tests) gets its own directory instead of replacing the stock export."""
    from featx.backbones.cards import get_card
    from featx.errors import UnknownBackboneError

    name = f"{safe_dirname(card.name)}-{weights_sha[:12]}"
    # another crop is the stock card seen another way: export_card names it in a suffix
    uncropped = dataclasses.replace(card, preprocess=dataclasses.replace(card.preprocess, crop="center"))
    try:
        stock = get_card(card.name).digest() == uncropped.digest()
    except UnknownBackboneError:
        stock = False
    return exports_dir() / (name if stock else f"{name}-{card.preprocess.input_size}px-{card.digest()[:8]}")


def write_export(module, pre: Preprocess, dest_dir: Path, meta: dict, precision: str = "fp32") -> Path:
    """Export, parity-check, and atomically publish ``dest_dir`` (model.onnx + model.json).

    ``meta`` is the provenance (name, dim, card, weights, ...) the sidecar records
    beside what the export measures. ``precision="fp16"`` exports a float16 copy of
    ``module`` and checks it against the float32 ``module`` itself, within FP16_PARITY_RTOL.
    """
    if precision not in PRECISIONS:
        raise ExportError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    with building(dest_dir) as tmp:
        onnx_path = tmp / MODEL
        t0 = time.perf_counter()
        if precision == "fp16":
            export_module(half_precision(module), pre, onnx_path, optimize=False)
        else:
            export_module(module, pre, onnx_path)
        parity = check_parity(module, onnx_path, pre, FP16_PARITY_RTOL if precision == "fp16" else PARITY_RTOL)
        side = Sidecar.from_dict({
            **meta,
            "featx_export": EXPORT_FORMAT,
            "precision": precision,
            "featx_version": __version__,
            "preprocess": pre.to_dict(),
            "opset": OPSET,
            "input": {"name": INPUT_NAME},
            "output": {"name": OUTPUT_NAME},
            "export_seconds": round(time.perf_counter() - t0, 2),
            "fingerprint": fingerprint_of(onnx_path.read_bytes(), pre),
        }, dest_dir / SIDECAR)
        dataclasses.replace(side, parity=parity).write(tmp / SIDECAR)
    return dest_dir


def export_card(card: BackboneCard, weights: str | os.PathLike | None = None,
                force: bool = False, precision: str = "fp32", features: str = "last") -> Path:
    """Export a registered backbone (cached). Returns the export directory.

    ``precision="fp16"`` writes a float16 graph (uint8 in, float32 embedding
    out) for GPUs, in its own directory with its own fingerprint.
    ``features="multi"`` pools intermediate stages into the embedding
    (featx.backbones.features), and a card whose preprocessing has
    ``crop="none"`` sees whole images: each in its own directory. A cached export whose
    model.json is damaged is exported again.
    """
    from featx.backbones.cards.weights import file_sha256, weights_file
    from featx.backbones.zoo import build

    check_features(features)
    wfile = weights_file(card.weights_source, card.name, weights)
    wsha = file_sha256(wfile)
    crop = card.preprocess.crop
    suffix = "".join(f"-{v}" for v in (f"crop-{crop}", features, precision)
                     if v not in ("crop-center", "last", "fp32"))
    dest = export_dir_for(card, wsha)
    dest = dest.with_name(dest.name + suffix)
    cached = None if force else cached_sidecar(dest)
    if (cached is not None and cached.export_format == EXPORT_FORMAT and cached.card_digest == card.digest()
            and cached.feature_version == (RECIPE_VERSION if features != "last" else None)):
        log.info("export of %s is cached at %s", card.name, dest)
        return dest
    torch = require("torch", "torch")
    log.info("exporting %s (weights %s)", card.name, wfile)
    backbone, _, _ = build(card, wfile)
    recipe = None
    if features != "last":
        backbone, recipe = multi_features(backbone, card)
    module = make_wrapper(backbone, card.preprocess)
    meta = {
        "name": card.name + suffix,
        "card": card.to_dict(),
        "card_digest": card.digest(),
        "weights": str(wfile) if weights is not None else card.weights,
        "weights_sha256": wsha,
        "dim": card.dim if recipe is None else recipe.dim,
        "torch_version": torch.__version__,
    }
    if recipe is not None:
        meta["features"] = recipe.to_dict()
    return write_export(module, card.preprocess, dest, meta, precision)
