"""Peak memory of `featx extract` at 1x and 10x the images: small images and large photos.

Run: .venv/bin/python bench/memory.py [--small 2000] [--photos 200]

Small: Fashion-MNIST PNGs (Debian's dataset-fashion-mnist), 2,000 vs 20,000.
Large: camera-size JPEGs (bench/extract.py's set), 200 vs 2,000.
Each run is a fresh `featx extract` process with an empty store; peak RSS is the
process's own VmHWM. Bounded queues should keep the 10x/1x ratio near 1 (the output
table itself, N x 1280 floats, is the one part that grows: 5 KiB an image).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from extract import make_photos, replicate, run_cli  # bench/extract.py


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=2000)
    ap.add_argument("--photos", type=int, default=200)
    a = ap.parse_args()

    from featx.backbones.resolve import resolve_backbone
    from featx.datasets import FASHION_MNIST_CLASSES, fashion_mnist, write_image_folder

    tmp = Path(tempfile.gettempdir())
    home = Path(tempfile.mkdtemp(prefix="featx-bench-mem-"))
    env = {**os.environ, "FEATX_HOME": str(home)}
    os.environ["FEATX_HOME"] = str(home)
    resolve_backbone("efficientnet_lite0")  # export once, outside the measured runs
    x, y = fashion_mnist("train")
    sets = {}
    for n in (a.small, 10 * a.small):
        sets[f"small {n}"] = write_image_folder(tmp / f"featx-bench-fm-first{n}", x[:n], y[:n],
                                                FASHION_MNIST_CLASSES)
    photos = make_photos(tmp / "featx-bench" / f"photos{a.photos}", a.photos)
    sets[f"photos {a.photos}"] = photos
    sets[f"photos {10 * a.photos}"] = replicate(photos, tmp / "featx-bench" / f"photos{a.photos}x10", 10)
    rss = {}
    for name, folder in sets.items():
        s, wall, peak = run_cli(["extract", str(folder), "--out", str(home / "t.parquet"),
                                 "--store", str(home / name.replace(" ", "-")), "--device", "cpu"], env)
        rss[name] = peak
        print(f"  {name:<14} {s['rows']:6d} rows  {wall:6.1f} s  peak RSS {peak:6.0f} MiB", flush=True)
    print(f"\npeak RSS 10x / 1x: small images {rss[f'small {10 * a.small}'] / rss[f'small {a.small}']:.2f}x, "
          f"photos {rss[f'photos {10 * a.photos}'] / rss[f'photos {a.photos}']:.2f}x")


if __name__ == "__main__":
    main()
