"""The calibrated near-duplicate threshold on real photos (the ones tests/test_audit.py uses).

    python bench/copy_threshold_photos.py WORKDIR

Extracts 17 distinct scikit-image photos (the gallery) and 4 user-made copies of each
(200x150 at JPEG 70, a 7% border crop at JPEG 80, mirrored half size, brightness +25),
calibrates the threshold on the gallery, and prints recall and false pairs of the copies at
the calibrated threshold and at the old fixed 0.95.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from featx.backbones.resolve import resolve_backbone
from featx.embed.table import read_table
from featx.extract import extract
from featx.similarity import duplicates

PHOTOS = ("astronaut", "brick", "camera", "chelsea", "cell", "clock", "coffee", "coins", "grass",
          "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket", "text")


def save(a, path: Path, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(a)).save(path, **kw)


def main(work: Path) -> None:
    import skimage.data as sd

    for name in PHOTOS:
        a = getattr(sd, name)()
        save(a, work / "gallery" / name / f"{name}.png")
        im = Image.fromarray(a).convert("RGB")
        w, h = im.size
        save(np.asarray(im.resize((200, 150))), work / "copies" / name / "small.jpg", quality=70)
        save(np.asarray(im.crop((w // 14, h // 14, w - w // 14, h - h // 14))), work / "copies" / name / "crop.jpg",
             quality=80)
        save(np.asarray(im.resize((w // 2, h // 2)))[:, ::-1], work / "copies" / name / "mirror.png")
        save(np.clip(np.asarray(im).astype(int) + 25, 0, 255).astype(np.uint8), work / "copies" / name / "bright.png")
    bb = resolve_backbone("efficientnet_lite0")
    extract(work / "gallery", bb, out=work / "gallery.featx.parquet")
    extract(work / "copies", bb, out=work / "copies.featx.parquet")
    t, u = read_table(work / "gallery.featx.parquet"), read_table(work / "copies.featx.parquet")
    for th in ("auto", 0.95):
        r = duplicates(t, across=u, threshold=th)
        pairs = {(t.labels[a], u.paths[b]) for a, b in zip(r.a.tolist(), r.b.tolist(), strict=True)}
        true = {p for p in pairs if p[1].split("/")[0] == p[0]}
        kinds = {k: sum(p[1].endswith(k) for p in true) for k in ("small.jpg", "crop.jpg", "mirror.png", "bright.png")}
        line = (f"threshold {r.threshold:.4f}: {len(true)} of {len(u)} copies found ({len(true) / len(u):.1%}; "
                f"{kinds}), {len(pairs) - len(true)} false pairs of {len(u) * len(t)} copy x photo pairs")
        if r.calibration is not None:
            c = r.calibration
            line += (f"; calibration: {c.recall:.1%} of {c.copies} altered copies, false rate "
                     f"{c.false_rate:.2%} of {c.distinct} photos, {c.reason}")
        print(line)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
