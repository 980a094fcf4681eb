"""torch -> ONNX export of a backbone: uint8 NHWC in, pooled embedding out.

Normalisation and the NHWC->NCHW transpose live inside the graph, so the
ONNX file and its sidecar are all any consumer needs. Exports are cached by
(card, weights, export format) and parity-checked against torch on real photos.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from . import __version__
from .cards import BackboneCard, Preprocess
from .errors import ExportError, require
from .paths import exports_dir

log = logging.getLogger(__name__)

EXPORT_FORMAT = 1
OPSET = 17
PARITY_RTOL = 1e-4
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

        def forward(self, x):
            x = x.permute(0, 3, 1, 2).float()
            return self.backbone((x - self.mean) / self.std)

    return PixelsToEmbedding().eval()


def parity_images(pre: Preprocess, n: int = 4) -> np.ndarray:
    """Real photos (scikit-image's bundled set) preprocessed for ``pre``: uint8 (n, s, s, 3)."""
    from .images import load_image

    try:
        import skimage.data as sd

        photos = [sd.chelsea(), sd.astronaut(), sd.coffee(), sd.rocket(), sd.camera()][:n]
    except ImportError:  # still real pixels, just fewer of them
        rng = np.random.default_rng(0)
        photos = [rng.integers(0, 256, (300, 400, 3), dtype=np.uint8) for _ in range(n)]
    return np.stack([load_image(p, pre) for p in photos])


def export_module(module, pre: Preprocess, dest: str | os.PathLike) -> None:
    """Trace ``module`` (uint8 NHWC -> embedding) to ONNX with a dynamic batch axis."""
    torch = require("torch", "torch")
    s = pre.input_size
    dummy = torch.zeros(2, s, s, 3, dtype=torch.uint8)  # batch >= 2 so nothing specialises on 1
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter is deprecated but gives a smaller, faster graph for CNNs
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module, (dummy,), str(dest), dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )


def check_parity(module, onnx_path: str | os.PathLike, pre: Preprocess) -> dict:
    """Run torch and ONNX Runtime on real photos; raise ExportError above PARITY_RTOL."""
    torch = require("torch", "torch")
    import onnxruntime as ort

    x = parity_images(pre)
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {INPUT_NAME: x})[0]
    max_abs = float(np.abs(got - ref).max())
    rel = max_abs / max(float(np.abs(ref).max()), 1e-12)
    result = {"images": len(x), "max_abs_diff": max_abs, "max_rel_diff": rel}
    if not rel <= PARITY_RTOL:
        raise ExportError(f"ONNX and torch disagree: max abs diff {max_abs:.3g} (relative {rel:.3g} > {PARITY_RTOL})")
    return result


def export_dir_for(card: BackboneCard, weights_sha: str) -> Path:
    return exports_dir() / f"{card.name}-{weights_sha[:12]}"


def write_export(module, pre: Preprocess, dest_dir: Path, meta: dict) -> Path:
    """Export, parity-check, and atomically publish ``dest_dir`` (model.onnx + model.json)."""
    from .backbone import fingerprint_of

    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}-", dir=dest_dir.parent))
    try:
        onnx_path = tmp / "model.onnx"
        t0 = time.perf_counter()
        export_module(module, pre, onnx_path)
        parity = check_parity(module, onnx_path, pre)
        meta = {
            **meta,
            "featx_export": EXPORT_FORMAT,
            "featx_version": __version__,
            "preprocess": pre.to_dict(),
            "opset": OPSET,
            "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC"},
            "output": {"name": OUTPUT_NAME, "dtype": "float32"},
            "parity": parity,
            "export_seconds": round(time.perf_counter() - t0, 2),
            "fingerprint": fingerprint_of(onnx_path.read_bytes(), pre),
        }
        (tmp / "model.json").write_text(json.dumps(meta, indent=2))
        publish(tmp, dest_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest_dir


def publish(tmp: Path, dest: Path) -> None:
    """Move a finished export directory into place (a rename, so never half-written)."""
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def export_card(card: BackboneCard, weights: str | os.PathLike | None = None,
                force: bool = False) -> Path:
    """Export a registered backbone (cached). Returns the export directory."""
    from .backbone import read_sidecar
    from .zoo import build, file_sha256, weights_file

    wfile = weights_file(card, weights)
    wsha = file_sha256(wfile)
    dest = export_dir_for(card, wsha)
    if not force and (dest / "model.json").is_file() and (dest / "model.onnx").is_file():
        meta = read_sidecar(dest / "model.json")
        if meta.get("featx_export") == EXPORT_FORMAT and meta.get("card_digest") == card.digest():
            log.info("export of %s is cached at %s", card.name, dest)
            return dest
    torch = require("torch", "torch")
    log.info("exporting %s (weights %s)", card.name, wfile)
    backbone, _, _ = build(card, wfile)
    module = make_wrapper(backbone, card.preprocess)
    meta = {
        "name": card.name,
        "card": card.to_dict(),
        "card_digest": card.digest(),
        "weights": str(wfile) if weights is not None else card.weights,
        "weights_sha256": wsha,
        "dim": card.dim,
        "torch_version": torch.__version__,
    }
    return write_export(module, card.preprocess, dest, meta)
