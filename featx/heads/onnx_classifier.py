"""One-file classifier: the backbone graph and the sklearn head merged into one ONNX model.

Input: uint8 pixels (N, S, S, 3), already decoded, resized and centre-cropped
by the backbone's preprocessing (``featx.embed.images.load_image``). The model's
metadata holds the spec (``featx.preprocess``) and the exact recipe in words
(``featx.preprocess_recipe``: JPEG draft decoding, one-pass resample of the crop
box), so the file can be used without featx; docs/heads.md gives it as a dozen
lines of Pillow + numpy. Outputs: ``probabilities`` (float32, N x K, columns in the
order of the ``featx.classes`` metadata) and ``label`` (class name, string).
The label is the argmax of the probabilities, exactly as ``featx predict``
picks it, so the two agree even for SVMs, whose own ``predict`` may disagree
with their calibrated probabilities. The probabilities are the calibrated ones:
a logistic head's temperature (``featx.heads.fit``) is folded into its
coefficients, so the converted graph computes softmax(logits / T) like featx;
``featx.calibration`` in the metadata records it. The head's novelty sample
(the "unknown" flag of ``featx predict``) is not part of the file.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np

from featx.atomic import write_bytes
from featx.backbones.artifact import Backbone
from featx.backbones.cards import Preprocess
from featx.errors import ExportError, OutputError
from featx.heads.headfile import Head, head_backbone, load_head

ML_OPSET = 3
# names the decode/resize/crop of featx.embed.images that the recipe below describes;
# change it (and the recipe, and docs/heads.md) whenever those change
RECIPE_VERSION = "featx-pillow-1"


def preprocess_recipe(spec: Preprocess) -> str:
    """featx's decode + resize + crop for ``spec``, in words and numbers, for people outside featx.

    It describes ``featx.embed.images`` (``decode`` with draft, ``resize_crop``) as
    ``load_image`` runs them on a file. An exported classifier carries it in its metadata
    (``featx.preprocess_recipe``); docs/heads.md has it as Pillow + numpy code, which
    tests/test_reference_preprocessing.py checks against ``load_image`` pixel for pixel.
    """
    S, R, interp = spec.input_size, spec.resize_size, spec.interpolation
    return "\n".join([
        f"featx preprocessing {RECIPE_VERSION} (Pillow). Model input: uint8 (N, {S}, {S}, 3), RGB, "
        "NHWC; mean/std are applied inside the graph.",
        f"1. Open the file with Pillow. If its format is JPEG and r = min(w, h) / {R} >= 2, call "
        "img.draft('RGB', (ceil(w / r), ceil(h / r))) before decoding: libjpeg then decodes at the "
        "strongest of the 1/2, 1/4, 1/8 reductions that keeps both sides at least that size.",
        "2. Apply the EXIF orientation (PIL.ImageOps.exif_transpose), after the draft. First frame only.",
        "3. Make it 8-bit RGB: RGBA, LA, PA, and palette images with transparency are pasted on "
        "white through their alpha; anything else img.convert('RGB') (16-bit grayscale is scaled "
        "by 255/65535 first).",
        f"4. With (w, h) the decoded size, s = {R} / min(w, h), W = max({S}, round(w * s)), "
        f"H = max({S}, round(h * s)), left = (W - {S}) / 2 / s, top = (H - {S}) / 2 / s: resample "
        f"the source box (left, top, left + {S} / s, top + {S} / s) straight to {S} x {S}, "
        f"{interp}, in ONE pass: img.resize(({S}, {S}), {interp.upper()}, box=...). No intermediate "
        f"image of shorter side {R}: resizing first and cropping after gives other pixels.",
        "Reference code (Pillow + numpy): docs/heads.md, 'Using the ONNX file without featx'.",
    ])


def _head_to_onnx(head: Head, dim: int, opset: int, input_name: str):
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    pipe = head.pipeline
    steps = getattr(pipe, "steps", [])
    # zipmap would turn probabilities into a list of dicts; we want a plain tensor
    options = {id(est): {"zipmap": False} for _, est in steps[-1:]} if steps else {id(pipe): {"zipmap": False}}
    try:
        with warnings.catch_warnings():
            # skl2onnx reads SVC's deprecated probA_/probB_ even when unused
            warnings.simplefilter("ignore", FutureWarning)
            return convert_sklearn(pipe, initial_types=[(input_name, FloatTensorType([None, dim]))],
                                   target_opset={"": opset, "ai.onnx.ml": ML_OPSET},
                                   options=options)
    except Exception as e:
        raise ExportError(f"skl2onnx cannot convert this head ({type(e).__name__}: {e}); "
                          "featx's logreg, linear-svm and svm-rbf heads are supported") from None


def add_label_output(model, proba_name: str, classes: list[str]) -> None:
    """Make ``model``'s outputs ``probabilities`` (from ``proba_name``) and ``label`` (its argmax's class).

    Shared by export-classifier and the classifier.onnx of a fine-tuning run, so both
    files answer ``session.run(["probabilities", "label"], ...)`` the same way.
    """
    from onnx import TensorProto, helper

    g = model.graph
    g.initializer.append(helper.make_tensor("class_names", TensorProto.STRING, [len(classes)],
                                            [c.encode() for c in classes]))
    if proba_name != "probabilities":
        g.node.append(helper.make_node("Identity", [proba_name], ["probabilities"]))
    g.node.extend([
        helper.make_node("ArgMax", ["probabilities"], ["label_index"], axis=1, keepdims=0),
        helper.make_node("Gather", ["class_names", "label_index"], ["label"], axis=0),
    ])
    del g.output[:]
    # probabilities first: `session.run(None, feed)[0]` is the same thing in both kinds of file
    g.output.extend([
        helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", len(classes)]),
        helper.make_tensor_value_info("label", TensorProto.STRING, ["batch"]),
    ])


def classifier_metadata(bb: Backbone, classes: list[str], head_sha256: str = "") -> dict[str, str]:
    """The ``featx.*`` metadata of a one-file classifier: classes, preprocessing spec and recipe, origin."""
    import PIL

    return {"featx.classes": json.dumps(classes), "featx.preprocess": bb.preprocess.canonical(),
            "featx.preprocess_recipe": preprocess_recipe(bb.preprocess),
            # Pillow's resampling is what the recipe names; say which one made the reference pixels
            "featx.pillow_version": PIL.__version__,
            "featx.fingerprint": bb.fingerprint, "featx.backbone": bb.name,
            "featx.head_sha256": head_sha256}


def set_classifier_metadata(model, bb: Backbone, classes: list[str], head_sha256: str = "") -> None:
    """Replace ``model``'s metadata with ``classifier_metadata``."""
    import onnx

    del model.metadata_props[:]
    for k, v in classifier_metadata(bb, classes, head_sha256).items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))


def build_classifier(head: Head, bb: Backbone):
    """The merged ``onnx.ModelProto`` (not yet saved)."""
    import onnx
    from onnx import compose

    bbm = onnx.load(str(bb.onnx_path))
    opset = next(o.version for o in bbm.opset_import if o.domain in ("", "ai.onnx"))
    bb_out = bbm.graph.output[0].name
    hm = _head_to_onnx(head, bb.dim, opset, "embedding_in")
    hm = compose.add_prefix(hm, "head/")
    # merge_models insists on one IR version and one opset per domain; skl2onnx emits the
    # lowest opset its ops need, and the ops it uses mean the same at the backbone's opset
    # (the numeric check in export_classifier would catch it otherwise)
    hm.ir_version = bbm.ir_version
    for o in hm.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = opset
    bbm = compose.add_prefix(bbm, "backbone/", rename_inputs=False, rename_outputs=False)
    proba_name = next(o.name for o in hm.graph.output if o.name.endswith("probabilities"))
    merged = compose.merge_models(bbm, hm, io_map=[(bb_out, "head/embedding_in")],
                                  outputs=[proba_name])
    merged.graph.name = f"featx_classifier_{bb.name}"
    classes = head.class_columns()
    add_label_output(merged, proba_name, classes)
    set_classifier_metadata(merged, bb, classes, head.meta.get("payload_sha256", ""))
    merged.metadata_props.append(onnx.StringStringEntryProto(
        key="featx.calibration", value=json.dumps(head.meta.get("train", {}).get("calibration")
                                                  or {"method": "none"})))
    onnx.checker.check_model(merged)
    return merged


def export_classifier(head: Head | str | os.PathLike, out: str | os.PathLike,
                      backbone: str | os.PathLike | Backbone | None = None,
                      check_tolerance: float = 1e-4) -> dict:
    """Write the one-file classifier to ``out`` and check it against featx's own path.

    The check runs a few deterministic images through both the merged model and
    backbone + sklearn head; a disagreement beyond ``check_tolerance`` (absolute,
    on probabilities) or in any label raises ExportError and nothing is written.
    """
    from featx.backbones.export import parity_images
    from featx.embed.runtime import Encoder, make_session

    h = head if isinstance(head, Head) else load_head(head)
    bb = head_backbone(h, backbone)
    model = build_classifier(h, bb)
    data = model.SerializeToString()
    pixels = parity_images(bb.preprocess, n=4)
    sess, _ = make_session(data, device="cpu")
    labels, proba = sess.run(["label", "probabilities"], {sess.get_inputs()[0].name: pixels})
    ref = h.proba(Encoder(bb, device="cpu")(pixels))
    diff = float(np.abs(proba - ref).max())
    classes = h.class_columns()
    ref_labels = [classes[j] for j in ref.argmax(1)]
    top2 = np.sort(ref, axis=1)[:, -2:] if ref.shape[1] > 1 else np.zeros((len(ref), 2))
    # a near-tie may fall either way in float32; every clear winner must agree
    clear = (top2[:, 1] - top2[:, 0]) > 10 * check_tolerance
    wrong = [i for i in range(len(ref)) if clear[i] and str(labels[i]) != ref_labels[i]]
    if diff > check_tolerance or wrong:
        raise ExportError(f"the merged classifier disagrees with backbone + head (max |dp| {diff:.2e}, "
                          f"labels {list(labels)} vs {ref_labels}); nothing written")
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(out.parent, e) from None
    write_bytes(out, data)  # a unique temporary, then a rename: concurrent exports cannot interleave
    return {"path": str(out), "bytes": out.stat().st_size, "input": sess.get_inputs()[0].name,
            "input_shape": ["batch", bb.preprocess.input_size, bb.preprocess.input_size, 3],
            "outputs": ["probabilities", "label"], "classes": classes,
            "preprocess": bb.preprocess.to_dict(), "recipe": preprocess_recipe(bb.preprocess),
            "fingerprint": bb.fingerprint,
            "check_max_abs_diff": diff}
