"""Plant 20 unrelated real photos in an ImageFolder and score ``featx audit``'s outliers.csv.

    python bench/audit_outliers.py plant SRC_FOLDER DST_FOLDER
        DST_FOLDER/<class>/: links to SRC_FOLDER's images, plus 20 real photos from
        scikit-image (17 distinct photos and 3 quarter-crops of the largest ones), each filed
        under a seeded random class as photo_<name>.png
    python bench/audit_outliers.py score AUDIT_DIR [--top 40]
        how many of the planted photos are in the top 40 of outliers.csv
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "brick", "camera", "chelsea", "cell", "clock", "coffee", "coins", "grass",
          "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket", "text")


def photos() -> dict[str, np.ndarray]:
    import skimage.data as sd

    out = {n: getattr(sd, n)() for n in PHOTOS}
    for n in ("retina", "hubble_deep_field", "astronaut"):  # 3 more: a quarter of the largest
        a = out[n]
        out[f"{n}_quarter"] = a[: a.shape[0] // 2, a.shape[1] // 2:]
    return out


def plant(src: str, dst: str, seed: int = 0) -> None:
    src_p, dst_p = Path(src).resolve(), Path(dst)
    classes = sorted(d.name for d in src_p.iterdir() if d.is_dir())
    for c in classes:
        (dst_p / c).mkdir(parents=True, exist_ok=True)
        for f in sorted((src_p / c).iterdir()):
            link = dst_p / c / f.name
            if not link.exists():
                os.symlink(f.resolve(), link)
    rng = np.random.default_rng(seed)
    for name, a in photos().items():
        c = classes[int(rng.integers(len(classes)))]
        Image.fromarray(np.ascontiguousarray(a)).save(dst_p / c / f"photo_{name}.png")
    print(f"planted {len(photos())} photos in {dst}")


def score(audit_dir: str, top: int) -> None:
    with open(Path(audit_dir) / "outliers.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    planted = [r for r in rows if Path(r["path"]).name.startswith("photo_")]
    hits = sum(Path(r["path"]).name.startswith("photo_") for r in rows[:top])
    flagged = [r for r in rows if r["flagged"] == "True"]
    fl_hits = sum(Path(r["path"]).name.startswith("photo_") for r in flagged)
    print(f"{hits} of {len(planted)} planted photos in the top {top} of outliers.csv; "
          f"flagged {len(flagged)}, of which {fl_hits} planted; lowest planted rank "
          f"{max(int(r['rank']) for r in planted)}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("plant")
    a.add_argument("src")
    a.add_argument("dst")
    b = sub.add_parser("score")
    b.add_argument("audit_dir")
    b.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    if args.cmd == "plant":
        plant(args.src, args.dst)
    else:
        score(args.audit_dir, args.top)
