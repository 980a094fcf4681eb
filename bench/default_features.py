"""Which default feature set wins: ``last`` vs ``multi`` vs raw pixels, on four kinds of data.

Run (FEATX_HOME shared so colleagues reuse the embeddings; a few minutes a data set on 2 cores):

    FEATX_HOME=/work/cache/featx-home nice -n 10 python bench/default_features.py \\
        --work /work/cache/i27a/default-features

Data sets (written once under --work as PNG/JPEG ImageFolders, train/ and test/ disjoint):

- ``fmnist-100``: Fashion-MNIST, 100 training images a class (seed 0), 100 a class of the
  test split (needs Debian's dataset-fashion-mnist);
- ``fmnist-30``: the same, 30 a class for training;
- ``digits``: scikit-learn's 8x8 digits, a stratified half for training, half for test;
- ``lfw``: scikit-image's LFW subset (100 faces, 100 non-faces, 25x25), half and half;
- ``photo-patches``: real photos bundled with scikit-image (12 of them: textures, a cat, the
  astronaut, coffee, a rocket, microscopy, the sky...), 40 random crops (a third to two
  thirds of the shorter side, flipped at random) of each photo's left half for training and
  40 of its right half for test; the class is the photo. No crop of the test set overlaps a
  training crop.

One ``multi`` extraction per split (``featx.extract.extract(..., features="multi")``); the
``last`` embedding is its final segment (the backbone's own pooled output, computed in the
same graph). Heads: ``featx.heads.fit.fit_head(C="auto")`` on raw pixels (at the images'
own size; the photo patches at 32x32), on ``last``, on ``multi``, on ``multi`` stored as
float16 (rounded, then fitted), and ``auto``: whichever of last and multi has the higher
CV accuracy, the choice fit-head makes with --features-segment auto. Prints one table;
writes <work>/results.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("brick", "grass", "gravel", "coffee", "chelsea", "astronaut", "rocket", "coins",
          "hubble_deep_field", "immunohistochemistry", "retina", "clock")


def _write(root: Path, images, labels, names=None) -> Path:
    for i, (a, y) in enumerate(zip(images, labels, strict=True)):
        d = root / str(names[y] if names is not None else y)
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(a)).save(d / f"{i:05d}.png")
    return root


def _split(n_per: dict, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    return train_test_split(np.arange(len(y)), test_size=0.5, stratify=y, random_state=seed)


def make_fmnist(root: Path, per_class: int, seed: int) -> None:
    from featx.datasets import FASHION_MNIST_CLASSES, fashion_mnist
    from featx.sampling import per_class_subset

    for split, n in (("train", per_class), ("test", 100)):
        x, y = fashion_mnist(split)
        idx = per_class_subset(y, n, seed)
        _write(root / split, x[idx], y[idx], FASHION_MNIST_CLASSES)


def make_digits(root: Path, seed: int) -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    img = np.round(d.images * (255 / 16)).astype(np.uint8)
    tr, te = _split({}, d.target, seed)
    _write(root / "train", img[tr], d.target[tr])
    _write(root / "test", img[te], d.target[te])


def make_lfw(root: Path, seed: int) -> None:
    import skimage.data as sd

    x = np.round(sd.lfw_subset() * 255).astype(np.uint8)
    y = np.array([0] * 100 + [1] * 100)
    tr, te = _split({}, y, seed)
    names = ["face", "non-face"]
    _write(root / "train", x[tr], y[tr], names)
    _write(root / "test", x[te], y[te], names)


def make_patches(root: Path, seed: int, per_class: int = 40) -> None:
    import skimage.data as sd

    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        a = getattr(sd, name)()
        if a.ndim == 2:
            a = np.stack([a] * 3, -1)
        a = a[..., :3]
        h, w = a.shape[:2]
        for split, (x0, x1) in (("train", (0, w // 2)), ("test", (w // 2, w))):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                s = int(rng.uniform(1 / 3, 2 / 3) * min(h, x1 - x0))
                y, x = rng.integers(0, h - s + 1), rng.integers(x0, x1 - s + 1)
                crop = a[y:y + s, x:x + s]
                if rng.random() < 0.5:
                    crop = crop[:, ::-1]
                Image.fromarray(np.ascontiguousarray(crop)).save(d / f"{i:03d}.jpg", quality=92)


MAKERS = {"fmnist-100": lambda r, s: make_fmnist(r, 100, s), "fmnist-30": lambda r, s: make_fmnist(r, 30, s),
          "digits": make_digits, "lfw": make_lfw, "photo-patches": make_patches}
RAW_SIZE = {"photo-patches": 32}


def raw_pixels(t, root: Path, name: str) -> np.ndarray:
    """The images themselves as features (grey or RGB, at their size or RAW_SIZE)."""
    size = RAW_SIZE.get(name)
    rows = []
    for p in t.paths:
        im = Image.open(root / p)
        if size:
            im = im.convert("RGB").resize((size, size), Image.BILINEAR)
        rows.append(np.asarray(im, np.float32).ravel())
    return np.stack(rows)


def probe(Xtr, ytr, Xte, yte) -> dict:
    from featx.heads.fit import fit_head

    t = time.perf_counter()
    pipe, rep = fit_head(Xtr, ytr, head="logreg", C="auto")
    pred = np.asarray(rep["classes"])[pipe.predict(Xte)]
    return {"dim": int(Xtr.shape[1]), "C": rep["C"], "cv": rep["cv_score_mean"],
            "test": float((pred == np.asarray(yte)).mean()), "fit_s": round(time.perf_counter() - t, 1)}


def run(name: str, work: Path, seed: int) -> dict:
    from featx.extract import extract

    root = work / name
    if not (root / "test").is_dir():
        MAKERS[name](root, seed)
    tables = {}
    for split in ("train", "test"):
        r = extract(root / split, "efficientnet_lite0", features="multi",
                    out=work / f"{name}-{split}.featx.parquet")
        tables[split] = r.table
    bb = r.backbone
    seg = bb.meta["features"]["segments"][-1]
    tr, te = tables["train"], tables["test"]
    last = slice(seg["start"], seg["stop"])
    out = {"train": len(tr), "test": len(te), "classes": len(set(tr.labels))}
    out["raw"] = probe(raw_pixels(tr, root / "train", name), tr.labels,
                       raw_pixels(te, root / "test", name), te.labels)
    out["last"] = probe(tr.X[:, last], tr.labels, te.X[:, last], te.labels)
    out["multi"] = probe(tr.X, tr.labels, te.X, te.labels)
    f16 = lambda a: a.astype(np.float16).astype(np.float32)  # noqa: E731
    out["multi-f16"] = probe(f16(tr.X), tr.labels, f16(te.X), te.labels)
    out["auto"] = dict(out["multi"] if out["multi"]["cv"] >= out["last"]["cv"] else out["last"],
                       picked="multi" if out["multi"]["cv"] >= out["last"]["cv"] else "last")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("bench/out/default-features"))
    ap.add_argument("--sets", default=",".join(MAKERS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    res_file = args.work / "results.json"
    results = json.loads(res_file.read_text()) if res_file.is_file() else {}
    for name in args.sets.split(","):
        results[name] = run(name, args.work, args.seed)
        res_file.write_text(json.dumps(results, indent=2))
        r = results[name]
        print(f"{name}: {r['train']} train / {r['test']} test, {r['classes']} classes", flush=True)
        for k in ("raw", "last", "multi", "multi-f16", "auto"):
            v = r[k]
            print(f"  {k:<10} dim {v['dim']:>5}  C {v['C']:<7g} CV {v['cv']:.4f}  test {v['test']:.4f}"
                  f"  fit {v['fit_s']} s" + (f"  (picked {v['picked']})" if "picked" in v else ""), flush=True)


if __name__ == "__main__":
    main()
