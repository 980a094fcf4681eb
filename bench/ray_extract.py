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
    ap.add_argument("--rounds", type=int, default=1, help="local/ray pairs, order alternated")
    ap.add_argument("--warm", action="store_true",
                    help="before the rounds, import featx and ONNX Runtime in every Ray worker (a task each)")
    args = ap.parse_args()

    import ray

    from featx.backbones.resolve import resolve_backbone
    from featx.embed.scan import scan
    from featx.engines.ray import connect
    from featx.extract import extract as local_extract

    folder = args.folder or fashion_folder(args.images)
    bb = resolve_backbone(args.backbone)
    found = scan(folder)
    for it in found.items:  # warm the page cache for both engines alike
        (folder / it.path).read_bytes()

    import numpy as np

    tmp = Path(tempfile.mkdtemp(prefix="featx-bench-"))
    t = time.perf_counter()
    connect(None, args.cpus)  # featx's own local start (worker niceness as the CLI's)
    ray_start = time.perf_counter() - t
    if args.warm:  # does a worker's first import explain Ray's start-up? (docs/scale.md: no)
        @ray.remote(num_cpus=1)
        def warm() -> int:
            import onnxruntime  # noqa: F401

            import featx.engines.ray  # noqa: F401
            return os.getpid()

        t = time.perf_counter()
        pids = ray.get([warm.remote() for _ in range(args.cpus)])
        print(f"warmed {len(set(pids))} workers in {time.perf_counter() - t:.1f} s", flush=True)
    ratios = []
    try:
        for rnd in range(args.rounds):  # alternate the order: the machine's load drifts
            rows = []
            for name in (("local", "ray") if rnd % 2 == 0 else ("ray", "local")):
                r = local_extract(folder, bb, store=tmp / f"{name}{rnd}", write=False,
                                  batch_size=args.batch_size, device="cpu", engine=name)
                rows.append((name, r))
            rows.sort(key=lambda x: x[0] != "local")
            ratios.append(rows[1][1].seconds / rows[0][1].seconds)
            print(f"round {rnd}: local {rows[0][1].seconds:.1f} s, ray {rows[1][1].seconds:.1f} s, "
                  f"ratio {ratios[-1]:.3f}", flush=True)
    finally:
        ray.shutdown()
    a, b = rows[0][1].table, rows[1][1].table
    same = a.keys == b.keys
    diff = float(np.abs(a.X - b.X).max()) if same else float("nan")
    print(f"same rows and keys: {same}; max |ray - local| embedding difference: {diff:.3g} "
          f"({'bit-identical' if diff == 0 else 'not identical'})")
    print(f"ratios: {[round(r, 3) for r in ratios]}, median {float(np.median(ratios)):.3f}; "
          f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

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
