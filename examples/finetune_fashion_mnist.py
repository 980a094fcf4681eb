"""What transfer buys on Fashion-MNIST: `featx compare`, then a fine-tune of the best setting.

Data: Debian's dataset-fashion-mnist (official train/test split), written as PNG
ImageFolder trees under examples/out/fmnist/. Nothing is downloaded.

    .venv/bin/python examples/finetune_fashion_mnist.py                   # everything below
    .venv/bin/python examples/finetune_fashion_mnist.py --per-class 10,100 --finetune-per-class skip
    .venv/bin/python examples/finetune_fashion_mnist.py --per-class none  # only the 60k fine-tune

One recipe for both steps (96 px input, every block trained, backbone learning
rate half the head's, crops of at least 35% of the image, batch 64):

1. `featx compare` at 10/100/1000 per class, 3 epochs, on 200 test images per
   class: about 15 minutes on 2 CPU cores;
2. `featx finetune` on all 60k training images for 8 epochs (47 minutes on 2 CPU
   cores), then `featx evaluate` on the official 10k test split.

At 224 px (--input-size 224) the fine-tune is a many-hour job on CPU; use
--device cuda on a GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def write_split(out: Path, split: str, per_class: int | None) -> Path:
    from featx.datasets import FASHION_MNIST_CLASSES, fashion_mnist, write_image_folder
    from featx.sampling import per_class_subset

    x, y = fashion_mnist(split)
    idx = per_class_subset(y, per_class)
    return write_image_folder(out / f"{split}-{per_class or 'all'}", x[idx], y[idx], FASHION_MNIST_CLASSES)


def featx(*args: str) -> None:
    print("$ featx " + " ".join(args), flush=True)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "featx.cli", *args], check=True)
    print(f"  ({time.perf_counter() - t:.0f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE / "out" / "fmnist")
    ap.add_argument("--per-class", default="10,100,1000", help="'none' skips featx compare")
    ap.add_argument("--epochs", type=int, default=3, help="compare's epochs for LP-FT and scratch")
    ap.add_argument("--test-per-class", type=int, default=200, help="compare's test images per class")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--input-size", type=int, default=96)
    ap.add_argument("--unfreeze", default="all")
    ap.add_argument("--backbone-lr", default="5e-4")
    ap.add_argument("--crop-scale", default="0.35")
    ap.add_argument("--batch-size", default="64")
    ap.add_argument("--finetune-per-class", default="all",
                    help="training images per class for the final fine-tune ('all' = 60k); 'skip' to skip")
    ap.add_argument("--finetune-epochs", type=int, default=8)
    args = ap.parse_args()

    from featx.datasets import fashion_mnist_available

    if not fashion_mnist_available():
        sys.exit("Fashion-MNIST not found: apt-get install dataset-fashion-mnist (or set FASHION_MNIST_DIR)")
    data = args.out / "data"
    test = write_split(data, "test", None)
    recipe = ["--input-size", str(args.input_size), "--unfreeze", args.unfreeze, "--lr", "1e-3",
              "--backbone-lr", args.backbone_lr, "--crop-scale", args.crop_scale, "--batch-size", args.batch_size,
              "--device", args.device]
    if args.per_class != "none":
        sizes = [s for s in args.per_class.split(",") if s != "all"]
        largest = max(int(s) for s in sizes) if sizes else None
        train = write_split(data, "train", largest)
        report = args.out / "compare"
        featx("compare", str(train), "--test", str(test), "--per-class", args.per_class, "--epochs",
              str(args.epochs), "--test-per-class", str(args.test_per_class), "--out", str(report), *recipe)
        print((report / "compare.md").read_text().split("\n\n![")[0])

    if args.finetune_per_class != "skip":
        n = None if args.finetune_per_class == "all" else int(args.finetune_per_class)
        ft_train = write_split(data, "train", n)
        run = args.out / "runs" / f"ft-{args.finetune_per_class}"
        if (run / "last.pt").is_file() and not (run / "summary.json").is_file():
            featx("finetune", "--resume", str(run), "--device", args.device)
        elif not (run / "summary.json").is_file():
            featx("finetune", str(ft_train), "--out", str(run), "--epochs", str(args.finetune_epochs), *recipe)
        featx("evaluate", str(run), str(test), "--out-dir", str(run / "eval"))
        metrics = json.loads((run / "eval" / "metrics.json").read_text())
        print(f"fine-tuned on {args.finetune_per_class} images/class: test accuracy "
              f"{metrics['accuracy']:.4f} on {metrics['n']} images; "
              f"curve: {run / 'curve.png'}; confusion matrix: {run / 'eval'}")


if __name__ == "__main__":
    main()
