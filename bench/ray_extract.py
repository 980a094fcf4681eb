"""Images/s of the Ray engine vs the local engine on the same folder, in one run.

    python bench/ray_extract.py                     # 2000 Fashion-MNIST PNGs written to /tmp
    python bench/ray_extract.py DIR --cpus 2        # your own folder

Each engine embeds the folder into its own fresh store (nothing cached), after one
read of every file so both see a warm page cache. Ray is started first and its
start-up is reported apart; the Ray figure includes spawning workers and actors,
which a long run amortises.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def fashion_folder(n: int) -> Path:
    from featx.datasets import FASHION_MNIST_CLASSES, fashion_mnist, write_image_folder
    from featx.sampling import per_class_subset

    root = Path(tempfile.gettempdir()) / f"featx-bench-fmnist-{n}"
    x, y = fashion_mnist("test")
    idx = per_class_subset(y, n // 10, seed=0)
    return write_image_folder(root, x[idx], y[idx], FASHION_MNIST_CLASSES)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", type=Path, help="image folder (default: Fashion-MNIST PNGs)")
    ap.add_argument("--images", type=int, default=2000, help="Fashion-MNIST images when no folder")
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs for the local Ray")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    args = ap.parse_args()

    import ray

    from featx.backbones.resolve import resolve_backbone
    from featx.embed.scan import scan
    from featx.extract import extract as local_extract

    folder = args.folder or fashion_folder(args.images)
    bb = resolve_backbone(args.backbone)
    found = scan(folder)
    for it in found.items:  # warm the page cache for both engines alike
        (folder / it.path).read_bytes()

    tmp = Path(tempfile.mkdtemp(prefix="featx-bench-"))
    t = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t
    try:
        rows = []
        for name in ("local", "ray"):
            r = local_extract(folder, bb, store=tmp / name, write=False, batch_size=args.batch_size,
                              device="cpu", engine=name)
            rows.append((name, r))
    finally:
        ray.shutdown()

    print(f"folder: {folder} ({len(found.items)} images), backbone {bb.name}, "
          f"{os.cpu_count()} CPUs, batch {args.batch_size}; ray.init took {ray_start:.1f} s (not counted)")
    print(f"{'engine':8}{'images':>8}{'wall s':>9}{'img/s':>9}{'embed-stage img/s':>20}")
    for name, r in rows:
        n = r.stats.embedded
        print(f"{name:8}{n:>8}{r.seconds:>9.1f}{n / r.seconds:>9.1f}{n / r.stats.seconds_embed:>20.1f}")
    (_, loc), (_, ray_r) = rows
    ratio = ray_r.seconds / loc.seconds
    print(f"overhead ratio (ray wall / local wall): {ratio:.2f}  ->  Ray costs {100 * (ratio - 1):+.0f}% "
          "over the local engine")


if __name__ == "__main__":
    main()
