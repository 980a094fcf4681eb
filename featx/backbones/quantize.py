"""int8 backbones: static QDQ quantisation calibrated on the user's own images, with a guard.

The guard measures the damage on images the calibration did not see: cosine
similarity of int8 vs fp32 embeddings, and (for labelled folders) the
cross-validated linear-probe accuracy of each. Above ``max_loss`` points the
int8 model is refused unless forced.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import numpy as np

from featx.backbones.artifact import (
    MODEL,
    SIDECAR,
    Backbone,
    GuardReport,
    Quantization,
    building,
    fingerprint_of,
    load_export,
    safe_dirname,
)
from featx.embed.images import load_image
from featx.embed.runtime import Encoder
from featx.embed.scan import scan
from featx.errors import FeatXError, ImageError, require
from featx.paths import exports_dir
from featx.progress import ProgressFn, no_progress
from featx.sampling import spread_over_classes

log = logging.getLogger(__name__)

__all__ = ["METHODS", "GuardReport", "QuantizationRefused", "guard", "probe_accuracy", "quantize_backbone"]

METHODS = ("minmax", "percentile", "entropy")
# Quantising everything (ORT's default) put the input normalisation (Cast/Sub/Div)
# in int8 too: on Fashion-MNIST with efficientnet_lite0 the int8 embeddings'
# cosine to fp32 was 0.89. Keeping those in float and quantising the conv
# blocks with their activations (Conv+Clip fuse to one int8 kernel) gives 0.98.
QUANTIZED_OPS = ["Conv", "Clip", "Relu", "Add", "GlobalAveragePool", "MatMul", "Gemm"]
# fused int8 kernels that agree less than this with the exact int8 computation saturate
KERNEL_MIN_COSINE = 0.99
KERNEL_PROBE_IMAGES = 32


class QuantizationRefused(FeatXError):
    """The int8 model lost more accuracy than allowed."""


def _sample(root: Path, n: int, seed: int) -> tuple[list[str], list[str | None]]:
    """Up to n paths, spread evenly over classes, in a seeded random order."""
    items = scan(root).items
    picked = spread_over_classes([it.label for it in items], n, seed)
    return [str(root / items[i].path) for i in picked], [items[i].label for i in picked]


def _pixels(paths: list[str], labels: list, backbone: Backbone, root: Path,
            use: str) -> tuple[np.ndarray, list]:
    arrs, labs = [], []
    first: ImageError | None = None
    for p, lab in zip(paths, labels, strict=True):
        try:
            arrs.append(load_image(p, backbone.preprocess))
            labs.append(lab)
        except ImageError as e:
            first = first or e
            log.info("calibration skips %s", e)
    if not arrs:
        raise FeatXError(f"{root}: none of the {len(paths)} images sampled for the {use} could be read "
                         f"(first: {first}); calibrate on a folder of readable images")
    return np.stack(arrs), labs


def _embed(enc: Encoder, pixels: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([enc(pixels[i:i + batch]) for i in range(0, len(pixels), batch)])


def probe_accuracy(X: np.ndarray, y: list, seed: int = 0) -> float | None:
    """Cross-validated accuracy of standardised logistic regression (None if too few labels)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    ya = np.asarray(y, dtype=object)
    _, counts = np.unique(ya.astype(str), return_counts=True)
    if len(counts) < 2 or counts.min() < 5:
        return None
    cv = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    return float(cross_val_score(clf, X, ya.astype(str), cv=cv).mean())


def guard(fp32: Backbone, int8: Backbone, pixels: np.ndarray, labels: list) -> GuardReport:
    """Cosine of int8 to fp32 embeddings, and each one's linear-probe accuracy when labelled."""
    a = _embed(Encoder(fp32, device="cpu"), pixels)
    b = _embed(Encoder(int8, device="cpu"), pixels)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    labelled = all(lab is not None for lab in labels)
    return GuardReport(
        images=len(pixels), cosine_mean=float(cos.mean()), cosine_min=float(cos.min()),
        probe_accuracy_fp32=probe_accuracy(a, labels) if labelled else None,
        probe_accuracy_int8=probe_accuracy(b, labels) if labelled else None,
    )


def _split(root: Path, backbone: Backbone, calib_images: int, guard_images: int, seed: int,
           progress: ProgressFn) -> tuple[np.ndarray, np.ndarray, list]:
    """(calibration pixels, guard pixels, guard labels): disjoint samples spread over classes."""
    paths, labels = _sample(root, calib_images + guard_images, seed)
    if len(paths) < 2:
        raise FeatXError(f"{root}: need at least 2 images to calibrate on")
    n_cal = min(calib_images, max(1, len(paths) // 2))
    progress("calibrate", 0, len(paths))
    cal_px, _ = _pixels(paths[:n_cal], labels[:n_cal], backbone, root, "calibration")
    ev_px, ev_labels = _pixels(paths[n_cal:], labels[n_cal:], backbone, root, "accuracy guard")
    progress("calibrate", len(paths), len(paths))
    return cal_px, ev_px, ev_labels


def _quantize_file(src: Path, dest: Path, cal_px: np.ndarray, input_name: str, method: str,
                   weight_bits: int = 8) -> None:
    """ORT static QDQ quantisation of ``src`` into ``dest``, calibrated on ``cal_px``.

    ``weight_bits=7`` quantises the weights of every conv and matmul to 7 bits except
    depthwise convs (see ``choose_weight_bits``).
    """
    require("onnxruntime.quantization", "cpu")
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            # equal batches: ORT's calibrators stack per-batch outputs
            b = 8 if len(cal_px) >= 8 else 1
            self.it = iter(cal_px[i:i + b] for i in range(0, len(cal_px) - b + 1, b))

        def get_next(self):
            batch = next(self.it, None)
            return None if batch is None else {input_name: batch}

    calib = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
             "entropy": CalibrationMethod.Entropy}[method]
    pre = dest.with_name("pre.onnx")
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    extra: dict = {"CalibPercentile": 99.999} if method == "percentile" else {}
    if weight_bits == 7:
        extra["TensorQuantOverrides"] = _full_range_depthwise(pre)
    quantize_static(str(pre), str(dest), Reader(),
                    quant_format=QuantFormat.QDQ, per_channel=True, calibrate_method=calib,
                    op_types_to_quantize=QUANTIZED_OPS, reduce_range=weight_bits == 7,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    extra_options=extra or None)
    pre.unlink()


def _full_range_depthwise(path: Path) -> dict:
    """TensorQuantOverrides keeping 8-bit weights in depthwise convs (their kernels accumulate
    in 32 bits, so they never saturate)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    dims = {i.name: list(i.dims) for i in m.graph.initializer}
    out = {}
    for n in m.graph.node:
        w = dims.get(n.input[1]) if n.op_type == "Conv" and len(n.input) > 1 else None
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        if w and len(w) == 4 and group > 1 and group == w[0] and w[1] == 1:
            out[n.input[1]] = [{"axis": 0, "reduce_range": False}] + [{"reduce_range": False}] * (w[0] - 1)
    return out


def kernel_cosine(int8_path: Path, pixels: np.ndarray, input_name: str) -> float:
    """Mean cosine between ONNX Runtime's fused int8 kernels and the same QDQ graph run in float.

    On x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) the fused u8 x s8 kernels add
    pairs of products in 16 bits, which saturates: efficientnet_lite0 on an AMD EPYC (AVX2)
    gave 0.81 cosine to fp32 fused and 0.98 computed exactly. This measures it on this CPU.
    """
    import onnxruntime as ort

    def run(level) -> np.ndarray:
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(int8_path), so, providers=["CPUExecutionProvider"])
        return np.concatenate([sess.run(None, {input_name: pixels[i:i + 8]})[0]
                               for i in range(0, len(pixels), 8)])

    a = run(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    b = run(ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return float(cos.mean())


def _quantize_for_this_cpu(src: Path, dest: Path, cal_px: np.ndarray, input_name: str,
                           method: str, weight_bits: int | None) -> tuple[int, float]:
    """Quantise with 8-bit weights; where this CPU's fused kernels then disagree with the
    exact int8 result (saturation), quantise again with 7-bit weights. (weight bits, kernel cosine).

    ``weight_bits`` 8 or 7 skips the choice (e.g. 8 for a model made here to run on a VNNI CPU).
    """
    probe = cal_px[:KERNEL_PROBE_IMAGES]
    _quantize_file(src, dest, cal_px, input_name, method, weight_bits or 8)
    agree = kernel_cosine(dest, probe, input_name)
    if weight_bits is not None or agree >= KERNEL_MIN_COSINE:
        return weight_bits or 8, agree
    log.warning("this CPU's int8 kernels saturate with 8-bit weights (fused vs exact cosine %.3f); "
                "quantising the weights to 7 bits instead", agree)
    _quantize_file(src, dest, cal_px, input_name, method, weight_bits=7)
    return 7, kernel_cosine(dest, probe, input_name)


def _verdict(g: GuardReport, max_loss: float, min_cosine: float) -> tuple[str, bool]:
    """(what the guard found, in words; whether it is too much)."""
    loss = g.loss_points
    if loss is not None:
        words = (f"linear-probe accuracy {100 * g.probe_accuracy_fp32:.2f}% fp32 -> "
                 f"{100 * g.probe_accuracy_int8:.2f}% int8 ({-loss:+.2f} points)")
        return words, loss > max_loss
    return f"mean cosine {g.cosine_mean:.4f} (no labels for a probe)", g.cosine_mean < min_cosine


def quantize_backbone(backbone: Backbone, calib_root: str | os.PathLike, *, calib_images: int = 300,
                      guard_images: int = 1000, method: str = "minmax", max_loss: float = 0.5,
                      min_cosine: float = 0.95, force: bool = False, seed: int = 0,
                      weight_bits: int | None = None, progress: ProgressFn = no_progress) -> Backbone:
    """Quantise ``backbone`` to int8 (QDQ, per-channel weights) calibrated on ``calib_root``.

    Returns the int8 export (its own fingerprint, usable as ``--backbone DIR``).
    Raises QuantizationRefused when the guard finds more than ``max_loss`` points
    of linear-probe accuracy lost (or, unlabelled, a mean cosine below
    ``min_cosine``), unless ``force``; the guard's figures are in
    ``sidecar.quantization.guard``.

    Weights are 8-bit, or 7-bit where this CPU's fused int8 kernels saturate
    (x86 without VNNI; see ``kernel_cosine``); ``weight_bits`` fixes the choice.
    """
    if method not in METHODS:
        raise FeatXError(f"calibration method {method!r} is not one of {', '.join(METHODS)}")
    if weight_bits not in (None, 7, 8):
        raise FeatXError(f"weight_bits must be 7, 8 or None (choose for this CPU), got {weight_bits!r}")
    root = Path(calib_root)
    cal_px, ev_px, ev_labels = _split(root, backbone, calib_images, guard_images, seed, progress)
    tag = fingerprint_of(backbone.fingerprint.encode() + f"{method}:{len(cal_px)}:{seed}:{weight_bits}".encode(),
                         backbone.preprocess)[:10]
    dest = exports_dir() / f"{safe_dirname(backbone.name)}-int8-{tag}"
    with building(dest) as tmp:
        t0 = time.perf_counter()
        bits, agree = _quantize_for_this_cpu(backbone.onnx_path, tmp / MODEL, cal_px, backbone.input_name,
                                             method, weight_bits)
        seconds = time.perf_counter() - t0
        # the candidate is a real backbone (its own fingerprint) before the guard judges it
        side = dataclasses.replace(backbone.sidecar, name=f"{backbone.name}-int8", parity=None,
                                   fingerprint=fingerprint_of((tmp / MODEL).read_bytes(), backbone.preprocess))
        progress("guard", 0, 1)
        g = guard(backbone, Backbone(tmp / MODEL, side), ev_px, ev_labels)
        progress("guard", 1, 1)
        verdict, bad = _verdict(g, max_loss, min_cosine)
        if bad and not force:
            raise QuantizationRefused(
                f"int8 {backbone.name} damages the embeddings too much on {root}: {verdict}, "
                f"cosine to fp32 mean {g.cosine_mean:.4f}. Keep fp32, try --calibration-method, "
                "or pass --force-quantize to keep it anyway."
            )
        # parity with torch is the fp32 export's; the guard replaces it
        dataclasses.replace(side, quantization=Quantization(
            method=method, calibration_root=str(root.resolve()), calibration_images=len(cal_px),
            base_fingerprint=backbone.fingerprint, seconds=round(seconds, 1), weight_bits=bits,
            kernel_cosine=round(agree, 5),
            guard=dataclasses.replace(g, max_loss=max_loss, forced=bool(bad and force)),
        )).write(tmp / SIDECAR)
    if bad:
        log.warning("int8 export kept although it %s (forced)", verdict)
    return load_export(dest)
