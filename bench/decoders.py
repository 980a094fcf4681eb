"""JPEG decoders for featx: speed on camera photos, and the accuracy guard against Pillow.

Run: .venv/bin/python bench/decoders.py [--n 300] [--repeat 3]
(the candidates other than Pillow need `pip install simplejpeg opencv-python-headless`;
a candidate whose package is missing is left out)

Each candidate reads a JPEG and returns featx's input, uint8 224x224x3 (shorter side
to 256 with DCT-domain downscaling by 1/2, 1/4 or 1/8, centre crop 224):
  - pillow: featx's own path (embed.images.load_image: draft + bicubic)
  - simplejpeg + Pillow resampling: simplejpeg decodes at Pillow's draft scale
  - simplejpeg + OpenCV INTER_AREA
  - OpenCV IMREAD_REDUCED_COLOR_2/4/8 + INTER_AREA
For each, in one run: images/s with 2 reader threads (best of the rounds), CPU ms per
image (thread CPU time, which a loaded machine changes far less than wall time), and
the guard: cosine of the default backbone's embeddings to Pillow's, and ImageNet top-1
agreement, on scikit-image's photos at camera size (x2.5, x4, x6, JPEG quality 90).
"""

from __future__ import annotations

import argparse
import io
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from extract import make_photos  # bench/extract.py


def _box(w: int, h: int, resize: int = 256, crop: int = 224) -> tuple[float, float, float, float]:
    scale = resize / min(w, h)
    nw, nh = max(crop, round(w * scale)), max(crop, round(h * scale))
    left, top = (nw - crop) / 2 / scale, (nh - crop) / 2 / scale
    return left, top, left + crop / scale, top + crop / scale


def _factor(w: int, h: int, resize: int = 256) -> int:
    return next(k for k in (8, 4, 2, 1) if min(w, h) / k >= resize)


def candidates(pre) -> dict:
    """name -> bytes -> uint8 (224, 224, 3); the ones whose packages are installed."""
    from PIL import Image

    from featx.embed.images import load_image

    out = {"pillow (featx)": lambda d: load_image(d, pre)}
    try:
        import simplejpeg
    except ImportError:
        simplejpeg = None
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        cv2 = None

    def sj(d):
        h, w = simplejpeg.decode_jpeg_header(d)[:2]
        k = _factor(w, h)
        return simplejpeg.decode_jpeg(d, "RGB", min_height=-(-h // k), min_width=-(-w // k))

    def area(a):
        left, top, right, bottom = _box(a.shape[1], a.shape[0])
        roi = a[round(top):round(bottom), round(left):round(right)]
        return cv2.resize(roi, (224, 224), interpolation=cv2.INTER_AREA)

    def cv_reduced(d):
        h, w = simplejpeg.decode_jpeg_header(d)[:2] if simplejpeg else Image.open(io.BytesIO(d)).size[::-1]
        flag = {8: cv2.IMREAD_REDUCED_COLOR_8, 4: cv2.IMREAD_REDUCED_COLOR_4, 2: cv2.IMREAD_REDUCED_COLOR_2,
                1: cv2.IMREAD_COLOR}[_factor(w, h)]
        return cv2.cvtColor(cv2.imdecode(np.frombuffer(d, np.uint8), flag), cv2.COLOR_BGR2RGB)

    if simplejpeg is not None:
        out["simplejpeg + Pillow resampling"] = lambda d: np.asarray(
            Image.fromarray(a := sj(d)).resize((224, 224), Image.BICUBIC, box=_box(a.shape[1], a.shape[0])))
        if cv2 is not None:
            out["simplejpeg + OpenCV INTER_AREA"] = lambda d: area(sj(d))
    if cv2 is not None:
        out["OpenCV IMREAD_REDUCED + INTER_AREA"] = lambda d: area(cv_reduced(d))
    return out


def rate(fn, files: list[Path], workers: int) -> float:
    """Images/s reading and decoding every file on ``workers`` threads."""
    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        n = sum(1 for _ in pool.map(lambda p: fn(p.read_bytes()), files))
    return n / (time.perf_counter() - t)


def cpu_ms(fn, datas: list[bytes]) -> float:
    t = time.thread_time()
    for d in datas:
        fn(d)
    return (time.thread_time() - t) / len(datas) * 1e3


def guard(cands: dict) -> dict:
    """Per candidate: (min cosine, mean cosine, top-1 agreement or None) against Pillow's."""
    import skimage.data as sd
    from PIL import Image

    from featx.backbones.resolve import resolve_backbone
    from featx.embed.runtime import Encoder

    bb = resolve_backbone("efficientnet_lite0")
    enc = Encoder(bb, device="cpu")
    datas = []
    for a in (sd.chelsea(), sd.astronaut(), sd.coffee(), sd.rocket(), sd.cat(), sd.immunohistochemistry(),
              sd.camera()):
        img = Image.fromarray(a).convert("RGB")
        for s in (2.5, 4.0, 6.0):
            b = io.BytesIO()
            img.resize((round(img.width * s), round(img.height * s)), Image.BILINEAR).save(b, "JPEG", quality=90)
            datas.append(b.getvalue())
    emb = {name: enc(np.stack([fn(d) for d in datas])) for name, fn in cands.items()}
    ref = emb["pillow (featx)"]
    top1 = _top1(emb)
    out = {}
    for name, e in emb.items():
        cos = (e * ref).sum(1) / np.linalg.norm(e, axis=1) / np.linalg.norm(ref, axis=1)
        agree = None if top1 is None else float(np.mean(top1[name] == top1["pillow (featx)"]))
        out[name] = (float(cos.min()), float(cos.mean()), agree)
    return out


def _top1(emb: dict) -> dict | None:
    try:
        import torch

        from featx.backbones.cards import get_card
        from featx.backbones.zoo import build
    except ImportError:
        return None
    _, classifier, _ = build(get_card("efficientnet_lite0"))
    with torch.no_grad():
        return {name: classifier(torch.from_numpy(e)).argmax(1).numpy() for name, e in emb.items()}


def main() -> None:
    import os
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="camera-size JPEGs (bench/extract.py's set)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="rounds; the best round of each is kept")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "featx-bench")
    a = ap.parse_args()

    from featx.backbones.cards import get_card

    os.environ.setdefault("FEATX_HOME", tempfile.mkdtemp(prefix="featx-bench-dec-"))
    files = sorted(make_photos(a.data / f"photos{a.n}", a.n).rglob("*.jpg"))
    cands = candidates(get_card("efficientnet_lite0").preprocess)
    datas = [p.read_bytes() for p in files[:60]]
    ips: dict = {}
    ms: dict = {}
    for _ in range(a.repeat):  # rounds: every candidate once each, so the load touches all alike
        for name, fn in cands.items():
            ips[name] = max(ips.get(name, 0.0), rate(fn, files, a.workers))
            ms[name] = min(ms.get(name, 1e9), cpu_ms(fn, datas))
    g = guard(cands)
    print(f"\nJPEG decoders, {len(files)} camera-size JPEGs -> 224 px, {a.workers} threads, "
          f"load {os.getloadavg()[0]:.1f}, best of {a.repeat} rounds")
    print(f"  {'':<36} {'img/s':>8} {'CPU ms/img':>11} {'cos min':>8} {'cos mean':>9} {'top-1 same':>11}")
    base = ips["pillow (featx)"]
    for name in cands:
        cmin, cmean, agree = g[name]
        top = "n/a" if agree is None else f"{agree:.0%}"
        print(f"  {name:<36} {ips[name]:8.1f} {ms[name]:11.2f} {cmin:8.4f} {cmean:9.4f} {top:>11}"
              f"   {ips[name] / base:.2f}x")
    print("  guard (issue 14): cosine >= 0.99 on every photo and the same top-1 as Pillow")


if __name__ == "__main__":
    main()
