"""A picture of the embedding space: ``featx plot TABLE``.

``plot_embeddings`` reads a table written by ``featx extract``, projects its
embeddings to 2-D and writes, into one folder:

* ``<table>.<method>.png``: a scatter coloured by label (one colour when unlabelled);
* ``<table>.<method>.html``: the same map, interactive and self-contained (no
  network): hover a point for its path, label and a thumbnail of the image, click
  a legend entry to hide or show its class, wheel to zoom, drag to pan,
  double-click to reset.

Methods: ``umap`` (umap-learn, the ``plot`` extra), ``tsne`` (scikit-learn) and
``pca``; ``auto`` takes UMAP where it is installed, else t-SNE. Embeddings are
L2-normalised first (so distances follow the cosine similarity the neighbour
search uses) and, for UMAP and t-SNE, reduced to 50 dimensions by PCA, the usual
recipe: it drops noise and makes the neighbour graph much cheaper. A table with
more than ``max_points`` rows is subsampled per class (every class keeps
points; the result says so). Every step is seeded: the same table and seed give
the same map.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featx.atomic import figure, write_text
from featx.embed.images import thumbnail
from featx.embed.scan import display_path
from featx.embed.table import EmbeddingTable, image_paths, read_table
from featx.errors import FeatXError, require
from featx.progress import ProgressFn, no_progress
from featx.sampling import spread_over_classes, stratified_split

__all__ = ["METHODS", "PlotResult", "embed_2d", "plot_embeddings", "subsample"]

log = logging.getLogger(__name__)

METHODS = ("auto", "umap", "tsne", "pca")
MAX_POINTS = 5000
MAX_THUMBNAILS = 2000  # ~2-3 KB each as base64 JPEG: the page stays a few MB
THUMB_PX = 64
PCA_DIMS = 50
MIN_NEIGHBOUR_POINTS = 5  # fewer points than this have no neighbourhoods to keep
PNG_SIZE = (1000, 800)  # pixels: figsize 10 x 8 inches at 100 dpi
UNLABELLED = "(no label)"


@dataclass
class PlotResult:
    """What ``plot_embeddings`` drew and where."""

    png: Path
    html: Path
    method: str  # the method used: umap, tsne or pca (never auto)
    points: int  # points drawn
    rows: int  # rows in the table
    classes: list[str]
    thumbnails: int  # points with a thumbnail in the HTML page
    seconds: float  # time spent on the projection
    notes: list[str] = field(default_factory=list)
    coords: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)), repr=False)
    paths: list[str] = field(default_factory=list, repr=False)  # of the drawn points, as in the table
    labels: list[str] = field(default_factory=list, repr=False)  # of the drawn points

    @property
    def subsampled(self) -> bool:
        return self.points < self.rows

    def to_dict(self) -> dict:
        return {"png": str(self.png), "html": str(self.html), "method": self.method, "points": self.points,
                "rows": self.rows, "subsampled": self.subsampled, "classes": self.classes,
                "thumbnails": self.thumbnails, "seconds": round(self.seconds, 3), "notes": self.notes}


def plot_embeddings(table: str | os.PathLike | EmbeddingTable, out_dir: str | os.PathLike | None = None, *,
                    method: str = "auto", max_points: int = MAX_POINTS, seed: int = 0,
                    max_thumbnails: int = MAX_THUMBNAILS, thumb_px: int = THUMB_PX,
                    progress: ProgressFn = no_progress) -> PlotResult:
    """Draw a 2-D map of a table's embeddings as a PNG and an interactive HTML page.

    Parameters
    ----------
    table : path of a table written by ``featx extract`` (file or folder of parts), or
        an ``EmbeddingTable`` (then ``out_dir`` is required).
    out_dir : folder for the two files (default: the table's folder); created if needed.
    method : ``auto`` (UMAP if umap-learn is installed, else t-SNE), ``umap``, ``tsne`` or ``pca``.
    max_points : at most this many points, subsampled per class when the table is larger.
    seed : seeds the subsample, PCA, t-SNE and UMAP: same seed, same map.
    max_thumbnails : this many points get a thumbnail in the HTML, taken round-robin over the
        classes (seeded), so a big map shows images of every class.
    thumb_px : longest side of a thumbnail, in pixels.
    progress : ``progress(stage, done, total)`` for "project" and "thumbnails".

    Returns
    -------
    PlotResult: paths of the PNG and HTML, the method used, points drawn, notes (subsampling,
    fallbacks, rows left out).
    """
    if method not in METHODS:
        raise FeatXError(f"unknown plot method {method!r}; choose one of {', '.join(METHODS)}")
    if max_points < 1:
        raise FeatXError(f"max_points must be at least 1 (got {max_points})")
    t, name, out = _load(table, out_dir)
    notes: list[str] = []
    groups = [UNLABELLED if lbl is None else display_path(lbl) for lbl in t.labels]
    finite = _finite_rows(t, name, notes)
    keep = finite[subsample([groups[i] for i in finite], max_points, seed)]
    if len(keep) < len(finite):
        notes.append(f"{len(keep)} of {len(finite)} rows drawn: subsampled per class to --max-points "
                     f"{max_points} (seed {seed})")
    chosen = _choose_method(method, len(keep), notes)
    progress("project", 0, 1)
    t0 = time.perf_counter()
    coords = embed_2d(t.X[keep], chosen, seed)
    seconds = time.perf_counter() - t0
    progress("project", 1, 1)
    log.info("%s map of %d points in %.1f s", chosen, len(keep), seconds)
    drawn = [groups[i] for i in keep]
    classes = _class_order(t, drawn)
    paths = [t.paths[i] for i in keep]
    files = image_paths(t, table, paths)
    thumbs = _thumbnails(files, spread_over_classes(drawn, max_thumbnails, seed), thumb_px, progress)
    stem = f"{_stem(name)}.{chosen}"  # the method in the name: maps by two methods sit side by side
    title = f"{name.name}: {_METHOD_TITLES[chosen]}, {len(keep)} of {len(t)} images"
    png = _draw_png(coords, drawn, classes, title, out / f"{stem}.png")
    page = _write_html(coords, drawn, classes, paths, thumbs, title, notes, out / f"{stem}.html")
    return PlotResult(png, page, chosen, len(keep), len(t), classes, sum(1 for x in thumbs if x), seconds,
                      notes, coords, paths, drawn)


_METHOD_TITLES = {"umap": "UMAP", "tsne": "t-SNE", "pca": "PCA"}


def _load(table, out_dir) -> tuple[EmbeddingTable, Path, Path]:
    """The table, the path it was read from (or a stand-in name) and the output folder (created)."""
    if isinstance(table, EmbeddingTable):
        if out_dir is None:
            raise FeatXError("plotting an EmbeddingTable in memory needs out_dir")
        t, name = table, Path("embeddings.parquet")
    else:
        name = Path(table)
        t = read_table(name)
    if len(t) == 0:
        raise FeatXError(f"{name}: the table has no rows, so there is nothing to plot")
    if t.X is None:
        raise FeatXError(f"{name}: the table holds no embeddings")
    out = Path(out_dir) if out_dir is not None else name.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FeatXError(f"cannot create {out}: {e.strerror or e}") from None
    return t, name, out


def _finite_rows(t: EmbeddingTable, name: Path, notes: list[str]) -> np.ndarray:
    ok = np.flatnonzero(np.isfinite(t.X).all(axis=1))
    if len(ok) == 0:
        raise FeatXError(f"{name}: every embedding holds NaN or infinity; extract the images again")
    if len(ok) < len(t):
        notes.append(f"{len(t) - len(ok)} rows left out: their embeddings hold NaN or infinity")
    return ok


def _stem(name: Path) -> str:
    return name.name[:-len(".parquet")] if name.name.endswith(".parquet") else name.name


def subsample(groups: Sequence, max_points: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``max_points`` rows, each group (class) in proportion.

    Every group keeps at least one row, so the cap gives way only when there are more
    groups than ``max_points``.
    """
    n = len(groups)
    if n <= max_points:
        return np.arange(n)
    g = np.asarray(groups, dtype=object)
    keep, _ = stratified_split(g, 1.0 - max_points / n, seed)
    excess = len(keep) - max_points
    if excess > 0:  # per-class rounding and the one-a-class floor overshoot a little
        counts = Counter(g[keep])
        drop = []
        for i in np.random.default_rng(seed).permutation(len(keep)):
            if len(drop) == excess:
                break
            if counts[g[keep[i]]] > 1:
                counts[g[keep[i]]] -= 1
                drop.append(i)
        keep = np.delete(keep, drop)
    return keep


def _choose_method(method: str, n: int, notes: list[str]) -> str:
    if method == "pca":
        return "pca"
    if n < MIN_NEIGHBOUR_POINTS:
        if method != "auto":
            raise FeatXError(f"{method} needs at least {MIN_NEIGHBOUR_POINTS} points (the table has {n}); "
                             "use --method pca")
        notes.append(f"PCA: {n} points are too few for UMAP or t-SNE")
        return "pca"
    if method == "auto":
        try:
            import umap  # noqa: F401
        except ImportError:
            notes.append("t-SNE: umap-learn is not installed (the 'plot' extra)")
            return "tsne"
        return "umap"
    return method


def embed_2d(X: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """2-D coordinates (float64, one row per row of ``X``) by ``pca``, ``tsne`` or ``umap``."""
    from sklearn.decomposition import PCA

    X = np.asarray(X, dtype=np.float64)
    X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    n, d = X.shape
    k = min(2 if method == "pca" else PCA_DIMS, n, d)
    Z = PCA(n_components=k, random_state=seed).fit_transform(X) if k < d or method == "pca" else X
    if method == "pca":
        out = Z
    elif method == "tsne":
        out = _tsne(Z, seed)
    elif method == "umap":
        out = _umap(Z, seed)
    else:
        raise FeatXError(f"unknown projection {method!r}; choose pca, tsne or umap")
    if out.shape[1] < 2:  # one point, or one-dimensional embeddings
        out = np.hstack([out, np.zeros((n, 2 - out.shape[1]))])
    return np.asarray(out, dtype=np.float64)


def _tsne(Z: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE

    # perplexity must stay below the number of points; 30 is the usual value. The number of
    # iterations is left at its default: its name changed (n_iter -> max_iter in sklearn 1.5)
    perplexity = min(30.0, max(1.0, (len(Z) - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                random_state=seed).fit_transform(Z)


def _umap(Z: np.ndarray, seed: int) -> np.ndarray:
    umap = require("umap", "plot")
    with warnings.catch_warnings():
        # a seed makes UMAP single-threaded, and it warns about that every time
        warnings.filterwarnings("ignore", message=r".*n_jobs value .* overridden", category=UserWarning)
        reducer = umap.UMAP(n_components=2, n_neighbors=min(15, len(Z) - 1), min_dist=0.1,
                            random_state=seed)
        return reducer.fit_transform(Z)


def _class_order(t: EmbeddingTable, drawn: list[str]) -> list[str]:
    """The table's classes as it recorded them, then any other label seen, then unlabelled."""
    present = set(drawn)
    listed = [display_path(c) for c in t.meta.get("classes") or [] if display_path(c) in present]
    rest = sorted(present - set(listed) - {UNLABELLED})
    return listed + rest + ([UNLABELLED] if UNLABELLED in present else [])


def _thumbnails(files: list[str | None], chosen: list[int], px: int, progress: ProgressFn) -> list[str]:
    """A ``data:`` URI (JPEG) per file: for the ``chosen`` ones that can be read, "" for the others."""
    def one(f: str | None) -> str:
        arr = thumbnail(f, px) if f else None
        if arr is None:
            return ""
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=80)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

    out = [""] * len(files)
    progress("thumbnails", 0, len(chosen))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # Pillow decodes without the GIL
        for done, (i, uri) in enumerate(zip(chosen, pool.map(one, [files[i] for i in chosen]), strict=True), 1):
            out[i] = uri
            if done % 64 == 0 or done == len(chosen):
                progress("thumbnails", done, len(chosen))
    return out


def class_colors(n: int) -> list[str]:
    """``n`` distinct colours as ``#rrggbb``: tab10 / tab20, a spread of turbo beyond 20."""
    import matplotlib
    from matplotlib.colors import to_hex

    if n <= 20:
        cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
        return [to_hex(cmap(i)) for i in range(n)]
    return [to_hex(c) for c in matplotlib.colormaps["turbo"](np.linspace(0.05, 0.95, n))]


def _draw_png(coords: np.ndarray, drawn: list[str], classes: list[str], title: str, path: Path) -> Path:
    colors = class_colors(len(classes))
    size = float(np.clip(20000 / max(len(drawn), 1), 3, 40))  # marker area in pt²: smaller as maps fill
    lab = np.asarray(drawn, dtype=object)
    with figure(path, figsize=(PNG_SIZE[0] / 100, PNG_SIZE[1] / 100), dpi=100) as (_, ax):
        for c, col in zip(classes, colors, strict=True):
            m = lab == c
            ax.scatter(coords[m, 0], coords[m, 1], s=size, color=col, alpha=0.75, linewidths=0,
                       label=f"{c} ({int(m.sum())})")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=11)
        if 1 < len(classes) <= 30:
            ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=max(1, 6 / size ** 0.5),
                      frameon=False)
    return path


def _write_html(coords: np.ndarray, drawn: list[str], classes: list[str], paths: list[str],
                thumbs: list[str], title: str, notes: list[str], path: Path) -> Path:
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    span = float(max(hi[0] - lo[0], hi[1] - lo[1])) or 1.0
    xy = (coords - lo) / span  # one scale for both axes, so the map is not stretched
    index = {c: i for i, c in enumerate(classes)}
    data = {"classes": classes, "colors": class_colors(len(classes)),
            "x": [round(float(v), 5) for v in xy[:, 0]], "y": [round(float(v), 5) for v in xy[:, 1]],
            "c": [index[g] for g in drawn], "path": [display_path(p) for p in paths],
            "thumb": thumbs}
    # "<" escaped, so no path or label can close the <script> element; still valid JSON
    blob = json.dumps(data, ensure_ascii=False).replace("<", "\\u003c")
    e = html.escape
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>{e(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{e(title)}</h1>"
            f"<p class=notes>{'<br>'.join(e(n) for n in notes)}</p>"
            "<p class=help>hover: image; click a class: hide/show; double-click a class: only it; "
            "wheel: zoom; drag: pan; double-click the map: reset</p>"
            "<div class=row><canvas id=map width=900 height=720></canvas><div id=legend></div></div>"
            "<div id=tip></div>"
            f"<script id=featx-data type=application/json>{blob}</script>"
            f"<script>{_JS}</script></body></html>")
    return write_text(path, page)


_CSS = ("body{font-family:sans-serif;margin:1em 2em} h1{font-size:1.2em} .row{display:flex;gap:1em}"
        " canvas{border:1px solid #ccc;cursor:crosshair;max-width:100%} .notes,.help{color:#555;font-size:.9em}"
        " #legend{font-size:.85em;max-height:720px;overflow:auto} #legend div{cursor:pointer;white-space:nowrap;"
        "padding:1px 4px;user-select:none} #legend div.off{opacity:.3} #legend span{display:inline-block;"
        "width:.9em;height:.9em;margin-right:.4em;border-radius:50%;vertical-align:middle}"
        " #tip{position:fixed;display:none;pointer-events:none;background:#fff;border:1px solid #999;"
        "padding:4px;font-size:.8em;max-width:320px;box-shadow:2px 2px 6px rgba(0,0,0,.2)}"
        " #tip img{display:block;max-width:128px;max-height:128px;margin-bottom:3px}")

# The page's whole program: a canvas scatter over the data above; nothing is fetched.
_JS = r"""
(function(){
const D = JSON.parse(document.getElementById('featx-data').textContent);
const cv = document.getElementById('map'), ctx = cv.getContext('2d'), tip = document.getElementById('tip');
const W = cv.width, H = cv.height, n = D.x.length, off = new Set();
const r = n > 5000 ? 2 : n > 1000 ? 3 : 4;
let v = {x0: -0.05, y0: -0.05, s: 1.1}, drag = null, hover = -1;
const sx = i => (D.x[i] - v.x0) / v.s * W, sy = i => H - (D.y[i] - v.y0) / v.s * H;
function draw(){
  ctx.clearRect(0, 0, W, H);
  for (let i = 0; i < n; i++) {
    if (off.has(D.c[i])) continue;
    ctx.fillStyle = D.colors[D.c[i]];
    ctx.globalAlpha = 0.75;
    ctx.beginPath(); ctx.arc(sx(i), sy(i), r, 0, 2 * Math.PI); ctx.fill();
  }
  ctx.globalAlpha = 1;
  if (hover >= 0) { ctx.strokeStyle = '#000'; ctx.lineWidth = 2;
    ctx.beginPath(); ctx.arc(sx(hover), sy(hover), r + 3, 0, 2 * Math.PI); ctx.stroke(); }
}
function at(ev){ const b = cv.getBoundingClientRect();
  return [(ev.clientX - b.left) * W / b.width, (ev.clientY - b.top) * H / b.height]; }
function nearest(px, py){
  let best = -1, bd = 100;
  for (let i = 0; i < n; i++) {
    if (off.has(D.c[i])) continue;
    const dx = sx(i) - px, dy = sy(i) - py, d = dx * dx + dy * dy;
    if (d < bd) { bd = d; best = i; }
  }
  return best;
}
function esc(s){ return s.replace(/[&<>"']/g, ch => '&#' + ch.charCodeAt(0) + ';'); }
cv.addEventListener('mousemove', ev => {
  const [px, py] = at(ev);
  if (drag) { v.x0 = drag.x0 - (px - drag.px) / W * v.s; v.y0 = drag.y0 + (py - drag.py) / H * v.s;
    draw(); return; }
  const i = nearest(px, py);
  if (i !== hover) { hover = i; draw(); }
  if (i < 0) { tip.style.display = 'none'; return; }
  tip.innerHTML = (D.thumb[i] ? '<img src="' + D.thumb[i] + '">' : '') +
    '<b>' + esc(D.classes[D.c[i]]) + '</b><br>' + esc(D.path[i]);
  tip.style.left = (ev.clientX + 14) + 'px'; tip.style.top = (ev.clientY + 14) + 'px';
  tip.style.display = 'block';
});
cv.addEventListener('mouseleave', () => { tip.style.display = 'none'; hover = -1; drag = null; draw(); });
cv.addEventListener('mousedown', ev => { const [px, py] = at(ev); drag = {px, py, x0: v.x0, y0: v.y0}; });
window.addEventListener('mouseup', () => { drag = null; });
cv.addEventListener('wheel', ev => {
  ev.preventDefault();
  const [px, py] = at(ev), f = ev.deltaY > 0 ? 1.2 : 1 / 1.2;
  const wx = v.x0 + px / W * v.s, wy = v.y0 + (H - py) / H * v.s;
  v.s *= f; v.x0 = wx - px / W * v.s; v.y0 = wy - (H - py) / H * v.s; draw();
}, {passive: false});
cv.addEventListener('dblclick', () => { v = {x0: -0.05, y0: -0.05, s: 1.1}; draw(); });
const legend = document.getElementById('legend'), counts = D.classes.map(() => 0);
D.c.forEach(c => counts[c]++);
D.classes.forEach((name, k) => {
  const el = document.createElement('div');
  el.innerHTML = '<span style="background:' + D.colors[k] + '"></span>' + esc(name) + ' (' + counts[k] + ')';
  el.addEventListener('click', () => { off.has(k) ? off.delete(k) : off.add(k);
    el.classList.toggle('off', off.has(k)); draw(); });
  el.addEventListener('dblclick', () => { off.clear(); D.classes.forEach((_, j) => { if (j !== k) off.add(j); });
    Array.from(legend.children).forEach((c, j) => c.classList.toggle('off', off.has(j))); draw(); });
  legend.appendChild(el);
});
draw();
})();
"""
