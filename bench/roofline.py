"""CPU roofline: model-only throughput of the default backbone as a fraction of the machine's sgemm rate.

Run: .venv/bin/python bench/roofline.py [--backbone efficientnet_lite0] [--images 256]

Measures, in one run: the float32 matrix-multiply rate (numpy and torch, large
square sgemm, the better of the two); the backbone's FLOPs per image (counted
from the ONNX graph); and ONNX Runtime images/s for a grid of session settings
(threads, batch size, graph optimisation, spinning). Prints each as a fraction of
the sgemm ceiling, the featx default beside the ORT-default baseline.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def sgemm_gflops(n: int = 4096, reps: int = 5) -> dict:
    out = {}
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    out["numpy"] = 2 * n**3 * reps / (time.perf_counter() - t) / 1e9
    try:
        import torch

        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        ta @ tb
        t = time.perf_counter()
        for _ in range(reps):
            ta @ tb
        out["torch"] = 2 * n**3 * reps / (time.perf_counter() - t) / 1e9
    except ImportError:
        pass
    return out


def ort_ips(onnx_path, pixels: np.ndarray, batch: int, threads: int | None, level: str, spin: bool,
            seconds: float = 4.0) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    if threads:
        so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x = pixels[:batch]
    sess.run(None, {name: x})
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        sess.run(None, {name: x})
        n += len(x)
    return n / (time.perf_counter() - t)


def traced_only_export(name: str, dest: Path) -> Path:
    """The export as featx made it before EXPORT_FORMAT 2: timm's run-time SAME padding traced
    as-is (Shape/Ceil/Pad chains), no ORT basic optimisation. The baseline for the static graph."""
    import warnings

    import torch

    from featx.backbones.cards import get_card
    from featx.backbones.export import make_wrapper
    from featx.backbones.zoo import build

    card = get_card(name)
    module = make_wrapper(build(card)[0], card.preprocess)
    s = card.preprocess.input_size
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(2, s, s, 3, dtype=torch.uint8),), str(dest), dynamo=False,
                          opset_version=17, input_names=["pixels"], output_names=["embedding"],
                          dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}})
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--quick", action="store_true", help="a smaller grid")
    a = ap.parse_args()

    from featx.backbones.export import parity_images
    from featx.backbones.flops import count_flops
    from featx.backbones.resolve import resolve_backbone
    from featx.embed.runtime import usable_cpus

    bb = resolve_backbone(a.backbone)
    flops = count_flops(bb.onnx_path)
    pixels = np.concatenate([parity_images(bb.preprocess, 4)] * 16)
    g = sgemm_gflops()
    ceiling = max(g.values())
    cores = usable_cpus()
    print(f"\nroofline: {bb.name}, {flops / 1e9:.3f} GFLOP/image, {cores} cores")
    print("  sgemm 4096^3: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in g.items())
          + f"  -> ceiling {ceiling:.1f} GFLOP/s = {ceiling * 1e9 / flops:.1f} img/s")
    grid = [(32, None, "ORT_ENABLE_ALL", True, "ORT defaults (baseline)")]
    batches = (1, 8, 32) if a.quick else (1, 8, 16, 32, 64)
    for b in batches:
        grid.append((b, cores, "ORT_ENABLE_ALL", True, f"batch {b}, {cores} threads, spin"))
    grid += [(32, cores, "ORT_ENABLE_ALL", False, "batch 32 whole, no spin"),
             (32, cores, "ORT_ENABLE_BASIC", True, "basic graph optimisation"),
             (32, 1, "ORT_ENABLE_ALL", True, "1 thread")]
    import tempfile

    traced = traced_only_export(a.backbone, Path(tempfile.mkdtemp()) / "traced.onnx")
    grid.insert(1, (32, None, "ORT_ENABLE_ALL", True, "ORT defaults, traced-only export", traced))
    rows = []
    for batch, threads, level, spin, label, *path in grid:
        ips = ort_ips(path[0] if path else bb.onnx_path, pixels, batch, threads, level, spin,
                      seconds=2.0 if a.quick else 4.0)
        frac = ips * flops / 1e9 / ceiling
        rows.append({"label": label, "batch": batch, "threads": threads, "level": level, "spin": spin,
                     "images_per_second": ips, "fraction_of_sgemm": frac})
        print(f"  {label:<32} {ips:7.1f} img/s  {ips * flops / 1e9:6.1f} GFLOP/s  {frac:5.0%} of ceiling")
    from featx.embed.runtime import Encoder

    enc = Encoder(bb, device="cpu")  # featx's default: decode batches of 32, sub-batches of 4, no spin
    enc(pixels[:32])
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < (2.0 if a.quick else 4.0):
        enc(pixels[:32])
        n += 32
    ips = n / (time.perf_counter() - t)
    frac = ips * flops / 1e9 / ceiling
    rows.append({"label": "featx Encoder default", "images_per_second": ips, "fraction_of_sgemm": frac})
    print(f"  {'featx Encoder default (sub-batch 4)':<32} {ips:7.1f} img/s  {ips * flops / 1e9:6.1f} GFLOP/s  "
          f"{frac:5.0%} of ceiling  ({ips / rows[0]['images_per_second']:.2f}x the ORT defaults, "
          f"{ips / rows[1]['images_per_second']:.2f}x them on the traced-only export)")
    best = max(rows, key=lambda r: r["images_per_second"])
    print(f"  best: {best['label']} at {best['fraction_of_sgemm']:.0%} of the sgemm ceiling "
          f"({best['images_per_second'] / rows[0]['images_per_second']:.2f}x the ORT defaults)")
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "roofline.json").write_text(json.dumps({"gflop_per_image": flops / 1e9, "sgemm": g,
                                                   "rows": rows, "cores": cores}, indent=2))


if __name__ == "__main__":
    main()
