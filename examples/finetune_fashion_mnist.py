"""What transfer buys on Fashion-MNIST: `featx compare`, then a fine-tune of the best setting.

Data: Debian's dataset-fashion-mnist (official train/test split), written as PNG
ImageFolder trees under examples/out/fmnist/. Nothing is downloaded.

    .venv/bin/python examples/finetune_fashion_mnist.py                 # the issue's setting
    .venv/bin/python examples/finetune_fashion_mnist.py --per-class 10,100 --epochs 3 \
        --input-size 96 --test-per-class 100                            # small CPU version

Full setting: compare at 10/100/1000 per class on the whole 10k test split, then
`featx finetune` on all 60k training images. On CPU at 224 px that fine-tune is a
many-hour job (EfficientNet-Lite0 trains at a few dozen images/s per core); use
--device cuda on a GPU, or --input-size to trade accuracy for time.
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
    ap.add_argument("--per-class", default="10,100,1000")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--unfreeze", default="2")
    ap.add_argument("--input-size", type=int, default=None, help="default: the card's (224)")
    ap.add_argument("--test-per-class", type=int, default=None, help="default: the whole test split")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--finetune-per-class", default="all",
                    help="training images per class for the final fine-tune ('all' = 60k); 'skip' to skip")
    ap.add_argument("--finetune-epochs", type=int, default=5)
    args = ap.parse_args()

    from featx.datasets import fashion_mnist_available

    if not fashion_mnist_available():
        sys.exit("Fashion-MNIST not found: apt-get install dataset-fashion-mnist (or set FASHION_MNIST_DIR)")
    sizes = [s for s in args.per_class.split(",") if s != "all"]
    largest = max(int(s) for s in sizes) if sizes else None
    data = args.out / "data"
    train = write_split(data, "train", largest)
    test = write_split(data, "test", args.test_per_class)
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
                  "--unfreeze", args.unfreeze, "--device", args.device, *size)
        featx("evaluate", str(run), str(test), "--out-dir", str(run / "eval"))


if __name__ == "__main__":
    main()
