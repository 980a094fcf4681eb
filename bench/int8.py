"""int8 vs fp32: speed of the model and of featx extract, and the guard's accuracy figures.

Run: .venv/bin/python bench/int8.py [--per-class 300] [--guard-images 2000]

On Fashion-MNIST (Debian's dataset-fashion-mnist) written as PNGs: quantises the
default backbone calibrated on 300 of those images, then prints in one run the
model-only images/s of fp32 and int8 on the same pre-decoded batch, featx extract
end to end with each, and the guard's cosine and linear-probe accuracies.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def model_ips(bb, pixels: np.ndarray, batch: int = 32, seconds: float = 6.0) -> float:
    from featx.embed.runtime import Encoder

    enc = Encoder(bb, device="cpu")
    enc(pixels[:batch])
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        enc(pixels[:batch])
        n += batch
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=300)
    ap.add_argument("--calib-images", type=int, default=300)
    ap.add_argument("--guard-images", type=int, default=2000)
    a = ap.parse_args()

    from featx.backbones.quantize import quantize_backbone
    from featx.backbones.resolve import resolve_backbone
    from featx.datasets import FASHION_MNIST_CLASSES, fashion_mnist, write_image_folder
    from featx.embed.images import load_image
    from featx.embed.scan import scan
    from featx.extract import extract
    from featx.sampling import per_class_subset

    x, y = fashion_mnist("train")
    idx = per_class_subset(y, a.per_class, seed=3)
    data = write_image_folder(Path(tempfile.gettempdir()) / f"featx-bench-fm{a.per_class}", x[idx], y[idx],
                              FASHION_MNIST_CLASSES)
    fp32 = resolve_backbone("efficientnet_lite0")
    t = time.perf_counter()
    int8 = quantize_backbone(fp32, data, calib_images=a.calib_images, guard_images=a.guard_images,
                             force=True)
    q_seconds = time.perf_counter() - t
    g = int8.meta["quantization"]["guard"]
    items = scan(data).items[:64]
    pixels = np.stack([load_image(data / it.path, fp32.preprocess) for it in items])
    m32, m8 = model_ips(fp32, pixels), model_ips(int8, pixels)
    store = Path(tempfile.mkdtemp(prefix="featx-bench-int8-"))
    e32 = extract(data, fp32, store=store / "a", device="cpu", write=False)
    e8 = extract(data, int8, store=store / "b", device="cpu", write=False)
    ips = lambda r: r.stats.embedded / r.stats.seconds_embed  # noqa: E731
    print(f"\nint8 vs fp32, efficientnet_lite0, CPU; Fashion-MNIST {a.per_class}/class "
          f"({len(e32.table)} images); quantisation + guard took {q_seconds:.0f} s")
    print(f"  model only (batch 32):   fp32 {m32:6.1f} img/s   int8 {m8:6.1f} img/s   "
          f"= {m8 / m32:.2f}x (target >= 1.8x)")
    print(f"  featx extract end to end: fp32 {ips(e32):6.1f} img/s   int8 {ips(e8):6.1f} img/s   "
          f"= {ips(e8) / ips(e32):.2f}x; end to end / model only: fp32 {ips(e32) / m32:.0%}, "
          f"int8 {ips(e8) / m8:.0%}")
    print(f"  guard on {g['images']} held-out images: cosine int8 vs fp32 mean {g['cosine_mean']:.4f}, "
          f"min {g['cosine_min']:.4f}")
    if g["loss_points"] is not None:
        print(f"  linear probe (5-fold CV): fp32 {100 * g['probe_accuracy_fp32']:.2f}%  "
              f"int8 {100 * g['probe_accuracy_int8']:.2f}%  (int8 - fp32: {-g['loss_points']:+.2f} points; "
              f"refused below -{g['max_loss']})")
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "int8.json").write_text(json.dumps({"model_fp32": m32, "model_int8": m8, "e2e_fp32": ips(e32),
                                               "e2e_int8": ips(e8), "guard": g}, indent=2))


if __name__ == "__main__":
    main()
