"""Honest probabilities (issue 27, item 2): calibration, unknown images and prediction sets.

Run: FEATX_HOME=... .venv/bin/python bench/calibration.py              # everything below
     .venv/bin/python bench/calibration.py --sets fm30,lfw --seeds 3   # a part

For each data set a logistic head is fitted with ``featx.heads.fit.fit_head_full(C="auto")``
(what ``featx fit-head`` runs) over several seeds of the CV split, for each way of
choosing C (``--select``), and scored on held-out images: accuracy, ECE (15 equal-width
bins, top label), median top probability, the C chosen and the temperature. The row
"accuracy, no T" is featx before this change (C by CV accuracy, no temperature).

Data sets: Fashion-MNIST at 30 and 200 images a class (drawn with seed 0 from the
official train split; test: all 10,000 official test images), scikit-image's LFW subset
(100 faces + 100 other patches, 25 x 25: half to train, half to test, stratified) and
scikit-learn's digits (225 to train, 1,572 to test). Fashion-MNIST images are read as
PNG files from ``--fmnist`` (``root/{train,test}/<class>/*.png``, as in /work/cache/fmnist)
so the shared embedding store serves them; without it they are embedded as arrays.

Unknown images: the Fashion-MNIST heads (seed 0) score 20 real photos (scikit-image's
photos and two crops of them) and the 10,000 test images; a photo should be flagged,
a garment not. Prediction sets: the share of test images whose ``--coverage`` set
holds the true class, and the mean set size.

Timings are not the point here; the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

SELECTS = ("log_loss", "accuracy")


def photos() -> dict[str, np.ndarray]:
    """20 real photos unlike Fashion-MNIST: scikit-image's bundled images and two crops."""
    import skimage.data as d

    names = ["astronaut", "camera", "chelsea", "coffee", "coins", "clock", "moon", "rocket",
             "hubble_deep_field", "immunohistochemistry", "retina", "brick", "grass", "gravel",
             "cell", "page", "text"]
    out = {n: np.asarray(getattr(d, n)()) for n in names}
    out["motorcycle"] = d.stereo_motorcycle()[0]
    out["astronaut_face"] = d.astronaut()[0:220, 150:340]
    out["coffee_cup"] = d.coffee()[50:350, 150:450]
    return out


def _fmnist(bb, fmnist: Path | None, per_class: int):
    from featx.datasets import FASHION_MNIST_CLASSES, fashion_mnist
    from featx.engines.files import embed_arrays, embed_paths

    rng = np.random.default_rng(0)
    if fmnist is not None:
        def listing(split: str, per: int | None):
            files, y = [], []
            for c, name in enumerate(sorted(FASHION_MNIST_CLASSES)):
                fs = sorted(os.listdir(fmnist / split / name))
                if per:
                    fs = [fs[i] for i in rng.permutation(len(fs))[:per]]
                files += [str(fmnist / split / name / f) for f in fs]
                y += [c] * len(fs)
            X, ok, _ = embed_paths(files, bb)
            return X, np.asarray(y)[ok]
        X, y = listing("train", per_class)
        Xt, yt = listing("test", None)
        return X, y, Xt, yt
    from featx.sampling import per_class_subset

    x, y = fashion_mnist("train")
    idx = per_class_subset(y, per_class, seed=0)
    xt, yt = fashion_mnist("test")
    return embed_arrays(x[idx], bb), y[idx], embed_arrays(xt, bb), yt


def data_set(name: str, bb, fmnist: Path | None):
    from featx.engines.files import embed_arrays
    from featx.sampling import stratified_split

    if name.startswith("fm"):
        return _fmnist(bb, fmnist, int(name[2:]))
    if name == "lfw":
        import skimage.data as d

        x = (d.lfw_subset() * 255).round().astype(np.uint8)
        y = np.r_[np.zeros(100, int), np.ones(100, int)]
        X = embed_arrays(list(x), bb)
        tr, te = stratified_split(y, 0.5, seed=0)
        return X[tr], y[tr], X[te], y[te]
    if name == "digits":
        from sklearn.datasets import load_digits

        dg = load_digits()
        x = (dg.images * 255 / 16).round().astype(np.uint8)
        X = embed_arrays(list(x), bb)
        y = dg.target
        tr, te = stratified_split(y, 1 - 225 / len(y), seed=0)
        return X[tr], y[tr], X[te], y[te]
    raise SystemExit(f"unknown data set {name!r}")


def scores(p: np.ndarray, y: np.ndarray) -> dict:
    from featx.evaluate import calibration

    right = p.argmax(1) == y
    return {"accuracy": float(right.mean()), "ece": calibration(p.max(1), right)["ece"],
            "median_top": float(np.median(p.max(1))), "mean_top": float(p.max(1).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", default="fm30,fm200,lfw,digits")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--select", default=",".join(SELECTS))
    ap.add_argument("--fmnist", type=Path, default=Path("/work/cache/fmnist"))
    ap.add_argument("--coverage", type=float, default=0.9)
    ap.add_argument("--out", type=Path, default=Path("calibration.json"))
    a = ap.parse_args()
    from featx.backbones.resolve import resolve_backbone
    from featx.heads.fit import fit_head_full

    bb = resolve_backbone("efficientnet_lite0")
    fmnist = a.fmnist if (a.fmnist / "test").is_dir() else None
    results: dict = {"backbone": bb.name, "seeds": a.seeds, "sets": {}}
    photo = photos()
    for name in a.sets.split(","):
        X, y, Xt, yt = data_set(name, bb, fmnist)
        rows = []
        for select in a.select.split(","):
            for seed in range(a.seeds):
                t0 = time.perf_counter()
                fit = fit_head_full(X, y, C="auto", seed=seed, select=select)
                secs = time.perf_counter() - t0
                T = fit.report["calibration"]["temperature"]
                p = fit.pipeline.predict_proba(Xt)
                row = {"select": select, "seed": seed, "C": fit.report["C"], "T": T,
                       "seconds": round(secs, 1), **scores(p, yt)}
                if select == "accuracy":  # featx before: the same head without its temperature
                    z = fit.pipeline.decision_function(Xt) * T
                    z = np.stack([-z / 2, z / 2], 1) if z.ndim == 1 else z
                    e = np.exp(z - z.max(1, keepdims=True))
                    row["before"] = scores(e / e.sum(1, keepdims=True), yt)
                if seed == 0 and select == "log_loss":
                    if fit.conformal is not None:
                        sets = fit.conformal.sets(p, a.coverage)
                        row["sets"] = {"coverage": a.coverage,
                                       "covered": float(sets[np.arange(len(yt)), yt].mean()),
                                       "mean_size": float(sets.sum(1).mean())}
                    if name.startswith("fm"):
                        P = _photo_embeddings(photo, bb)
                        flagged = fit.novelty.is_unknown(P)
                        row["unknown"] = {
                            "photos_flagged": int(flagged.sum()), "photos": len(P),
                            "missed": [n for n, f in zip(photo, flagged, strict=True) if not f],
                            "test_flagged": float(fit.novelty.is_unknown(Xt).mean()),
                            "threshold": fit.novelty.threshold()}
                rows.append(row)
                print(json.dumps({"set": name, **row}), flush=True)
        results["sets"][name] = {"train": len(y), "test": len(yt), "runs": rows}
        _summary(name, rows)
    a.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {a.out}")


def _photo_embeddings(photo: dict, bb) -> np.ndarray:
    from featx.engines.files import embed_arrays

    return embed_arrays([a if a.ndim == 3 else np.stack([a] * 3, -1) for a in
                         (np.asarray(v, np.uint8) if v.dtype != bool else v.astype(np.uint8) * 255
                          for v in photo.values())], bb)


def _summary(name: str, rows: list[dict]) -> None:
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["select"], []).append(r)
    for sel, rs in by.items():
        line = (f"{name:7} C by {sel:9} C {[r['C'] for r in rs]}  T {[round(r['T'], 2) for r in rs]}  "
                f"acc {np.mean([r['accuracy'] for r in rs]):.4f}  ECE mean {np.mean([r['ece'] for r in rs]):.4f} "
                f"max {np.max([r['ece'] for r in rs]):.4f}  median top {np.mean([r['median_top'] for r in rs]):.3f}")
        print(line)
        if "before" in rs[0]:
            b = [r["before"] for r in rs]
            print(f"{name:7} before (accuracy, no T): ECE mean {np.mean([x['ece'] for x in b]):.4f} "
                  f"max {np.max([x['ece'] for x in b]):.4f}  median top {np.mean([x['median_top'] for x in b]):.3f}")


if __name__ == "__main__":
    main()
