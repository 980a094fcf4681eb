"""What transfer buys on Fashion-MNIST: `featx compare`, then a fine-tune of the best setting.

Data: Debian's dataset-fashion-mnist (official train/test split), written as PNG
ImageFolder trees under examples/out/fmnist/. Nothing is downloaded.

    .venv/bin/python examples/finetune_fashion_mnist.py                 # the issue's setting
    .venv/bin/python examples/finetune_fashion_mnist.py --per-class 10,100 --epochs 3 \
        --input-size 96 --test-per-class 100 --finetune-per-class skip  # small CPU version
    .venv/bin/python examples/finetune_fashion_mnist.py --per-class none  # only the 60k fine-tune

Full setting: compare at 10/100/1000 per class on the whole 10k test split, then
`featx finetune` on all 60k training images with the recipe below (96 px input,
every block trained, backbone learning rate half the head's, crops of at least
35% of the image, 8 epochs): under an hour on 2 CPU cores, then `featx evaluate`
on the official 10k test split. At 224 px the same fine-tune is a many-hour job
on CPU; use --device cuda on a GPU and --finetune-input-size 224.
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
    from featx.datasets import FASHION_MNIST_CLASSES, fashion_mnist, subsample, write_image_folder

    x, y = fashion_mnist(split)
    idx = subsample(y, per_class)
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
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--unfreeze", default="2")
    ap.add_argument("--input-size", type=int, default=None, help="default: the card's (224)")
    ap.add_argument("--test-per-class", type=int, default=None, help="default: the whole test split")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--finetune-per-class", default="all",
                    help="training images per class for the final fine-tune ('all' = 60k); 'skip' to skip")
    ap.add_argument("--finetune-epochs", type=int, default=8)
    ap.add_argument("--finetune-input-size", type=int, default=96)
    ap.add_argument("--finetune-unfreeze", default="all")
    ap.add_argument("--finetune-backbone-lr", default="5e-4")
    ap.add_argument("--finetune-crop-scale", default="0.35")
    ap.add_argument("--finetune-batch-size", default="64")
    args = ap.parse_args()

    from featx.datasets import fashion_mnist_available

    if not fashion_mnist_available():
        sys.exit("Fashion-MNIST not found: apt-get install dataset-fashion-mnist (or set FASHION_MNIST_DIR)")
    data = args.out / "data"
    test = write_split(data, "test", args.test_per_class)
    if args.per_class != "none":
        sizes = [s for s in args.per_class.split(",") if s != "all"]
        largest = max(int(s) for s in sizes) if sizes else None
        train = write_split(data, "train", largest)
        size = ["--input-size", str(args.input_size)] if args.input_size else []
        report = args.out / "compare"
        featx("compare", str(train), "--test", str(test), "--per-class", args.per_class, "--epochs",
              str(args.epochs), "--unfreeze", args.unfreeze, "--device", args.device, "--out", str(report),
              *size)
        rows = json.loads((report / "compare.json").read_text())["rows"]
        print(json.dumps(rows, indent=1))

    if args.finetune_per_class != "skip":
        n = None if args.finetune_per_class == "all" else int(args.finetune_per_class)
        ft_train = write_split(data, "train", n)
        run = args.out / "runs" / f"ft-{args.finetune_per_class}"
        if (run / "last.pt").is_file() and not (run / "summary.json").is_file():
            featx("finetune", "--resume", str(run), "--device", args.device)
        elif not (run / "summary.json").is_file():
            featx("finetune", str(ft_train), "--out", str(run), "--epochs", str(args.finetune_epochs),
                  "--input-size", str(args.finetune_input_size), "--unfreeze", args.finetune_unfreeze,
                  "--lr", "1e-3", "--backbone-lr", args.finetune_backbone_lr,
                  "--crop-scale", args.finetune_crop_scale, "--batch-size", args.finetune_batch_size,
                  "--device", args.device)
        featx("evaluate", str(run), str(test), "--out-dir", str(run / "eval"))
        metrics = json.loads((run / "eval" / "metrics.json").read_text())
        print(f"fine-tuned on {args.finetune_per_class} images/class: test accuracy "
              f"{metrics['accuracy']:.4f} on {metrics['n']} images; "
              f"curve: {run / 'curve.png'}; confusion matrix: {run / 'eval'}")


if __name__ == "__main__":
    main()
