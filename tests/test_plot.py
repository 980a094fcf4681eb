"""featx plot: a 2-D map of a real table of real photos, as PNG and self-contained HTML."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from featx.cli import main
from featx.embed.table import EmbeddingTable, read_table, write_table
from featx.errors import FeatXError
from featx.extract import extract
from featx.plot import PNG_SIZE, UNLABELLED, plot_embeddings, subsample

from .helpers import make_image_folder


def _has_umap() -> bool:
    try:
        import umap  # noqa: F401
    except ImportError:
        return False
    return True


HAS_UMAP = _has_umap()


@pytest.fixture(scope="module")
def photos_table(tmp_path_factory, lite0) -> Path:
    """20 real photo crops in two classes (cats; coffee and rocket), extracted with the default backbone."""
    d = tmp_path_factory.mktemp("plot")
    folder = make_image_folder(d / "data", per_class=10)
    return extract(folder, lite0, out=d / "photos.featx.parquet", device="cpu").out


def page_data(html_path: Path) -> dict:
    """The points the HTML page draws, read back from its embedded JSON."""
    text = html_path.read_text(encoding="utf-8")
    m = re.search(r"<script id=featx-data type=application/json>(.*?)</script>", text, flags=re.S)
    assert m, "the page carries no data block"
    return json.loads(m.group(1))


def nn_accuracy(coords: np.ndarray, labels: list[str]) -> float:
    """Leave-one-out 1-nearest-neighbour accuracy on the 2-D map."""
    d = ((coords[:, None, :] - coords[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    lab = np.asarray(labels)
    return float((lab[d.argmin(axis=1)] == lab).mean())


def test_pca_map_png_and_self_contained_html(photos_table, tmp_path):
    r = plot_embeddings(photos_table, tmp_path / "out", method="pca")
    assert r.method == "pca" and r.points == r.rows == 20 and not r.subsampled
    assert r.png == tmp_path / "out" / "photos.featx.pca.png" and r.html.name == "photos.featx.pca.html"
    with Image.open(r.png) as im:
        im.verify()
    with Image.open(r.png) as im:
        assert im.format == "PNG" and im.size == PNG_SIZE
        px = np.asarray(im.convert("RGB"))
    assert len(np.unique(px.reshape(-1, 3), axis=0)) > 10  # points and text, not a blank canvas
    t = read_table(photos_table)
    data = page_data(r.html)
    assert sorted(data["path"]) == sorted(t.paths) and data["classes"] == ["cat", "thing"]
    shown = {p: data["classes"][c] for p, c in zip(data["path"], data["c"], strict=True)}
    assert shown == dict(zip(t.paths, t.labels, strict=True))
    assert len(data["x"]) == len(data["y"]) == 20 and len(data["colors"]) == 2
    assert r.thumbnails == 20 and all(u.startswith("data:image/jpeg;base64,") for u in data["thumb"])
    with Image.open(io.BytesIO(base64.b64decode(data["thumb"][0].split(",", 1)[1]))) as th:
        assert th.format == "JPEG" and max(th.size) <= 64
    text = r.html.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text  # nothing fetched: no CDN, no font
    refs = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", text)
    assert all(ref.startswith("data:") for ref in refs), refs


def test_pca_map_separates_the_two_classes(photos_table, tmp_path):
    r = plot_embeddings(photos_table, tmp_path, method="pca")
    assert nn_accuracy(r.coords, r.labels) == 1.0
    lab = np.asarray(r.labels)
    centroids = {c: r.coords[lab == c].mean(axis=0) for c in ("cat", "thing")}
    spread = np.mean([np.linalg.norm(r.coords[lab == c] - centroids[c], axis=1).mean() for c in centroids])
    assert np.linalg.norm(centroids["cat"] - centroids["thing"]) > 1.5 * spread


def test_tsne_is_seeded_and_separates(photos_table, tmp_path):
    a = plot_embeddings(photos_table, tmp_path / "a", method="tsne", seed=3)
    b = plot_embeddings(photos_table, tmp_path / "b", method="tsne", seed=3)
    assert a.method == "tsne" and a.png.name == "photos.featx.tsne.png"
    np.testing.assert_array_equal(a.coords, b.coords)
    assert a.paths == b.paths and nn_accuracy(a.coords, a.labels) >= 0.95
    assert page_data(a.html) == page_data(b.html)


@pytest.mark.skipif(not HAS_UMAP, reason="umap-learn is not installed (pip install '.[plot]')")
def test_umap_map(photos_table, tmp_path):
    r = plot_embeddings(photos_table, tmp_path, method="umap", seed=0)
    assert r.method == "umap" and r.html.name == "photos.featx.umap.html"
    assert r.coords.shape == (20, 2) and nn_accuracy(r.coords, r.labels) >= 0.95


def test_auto_takes_umap_when_installed_else_tsne(photos_table, tmp_path):
    r = plot_embeddings(photos_table, tmp_path, method="auto")
    if HAS_UMAP:
        assert r.method == "umap" and r.notes == []
    else:
        assert r.method == "tsne" and any("umap-learn is not installed" in n for n in r.notes)


def test_subsample_is_proportional_capped_and_keeps_every_class():
    groups = ["a"] * 1000 + ["b"] * 60 + ["c"] * 1
    idx = subsample(groups, 100, seed=0)
    kept = [groups[i] for i in idx]
    assert len(idx) == 100 and len(set(idx.tolist())) == 100 and list(idx) == sorted(idx)
    # in proportion (94.3 and 5.7 of 100), the one c kept, the rounding overshoot trimmed
    assert kept.count("c") == 1 and 93 <= kept.count("a") <= 94 and 5 <= kept.count("b") <= 6
    np.testing.assert_array_equal(idx, subsample(groups, 100, seed=0))
    assert not np.array_equal(idx, subsample(groups, 100, seed=1))
    np.testing.assert_array_equal(subsample(groups, 5000), np.arange(len(groups)))


def test_large_table_is_subsampled_per_class(photos_table, tmp_path):
    r = plot_embeddings(photos_table, tmp_path, method="pca", max_points=6, seed=1)
    assert r.points == 6 and r.rows == 20 and r.subsampled
    assert sorted(r.labels) == ["cat"] * 3 + ["thing"] * 3
    assert any("6 of 20 rows drawn" in n and "subsampled per class" in n for n in r.notes)
    data = page_data(r.html)
    assert len(data["path"]) == 6 and set(data["path"]) == set(r.paths)
    assert "6 of 20 rows drawn" in r.html.read_text(encoding="utf-8")
    few = plot_embeddings(photos_table, tmp_path, method="pca", max_thumbnails=4)
    with_thumb = [lbl for lbl, u in zip(few.labels, page_data(few.html)["thumb"], strict=True) if u]
    assert few.thumbnails == 4 and sorted(with_thumb) == ["cat", "cat", "thing", "thing"]


def test_unlabelled_table_is_one_colour_and_missing_images_have_no_thumbnail(lite0, tmp_path):
    src = make_image_folder(tmp_path / "src", per_class=3)
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(src.rglob("*.*")):
        shutil.copy(p, flat / f"{p.parent.name}-{p.name}")
    table = extract(flat, lite0, out=tmp_path / "flat.parquet", device="cpu").out
    gone = sorted(flat.iterdir())[0]
    gone.unlink()  # moved away since the extract: its point stays, without a thumbnail
    r = plot_embeddings(table, None, method="pca")
    assert r.png.parent == tmp_path and r.classes == [UNLABELLED]
    data = page_data(r.html)
    assert data["classes"] == [UNLABELLED] and len(data["colors"]) == 1 and set(data["c"]) == {0}
    thumbs = dict(zip(data["path"], data["thumb"], strict=True))
    assert thumbs.pop(gone.name) == "" and all(thumbs.values()) and r.thumbnails == 5


def test_paths_and_labels_cannot_break_out_of_the_page(photos_table, tmp_path):
    t = read_table(photos_table)
    t.labels = ["</script><b>x</b>" if lbl == "cat" else "a & 'b'" for lbl in t.labels]
    t.meta = {}
    r = plot_embeddings(t, tmp_path, method="pca")
    text = r.html.read_text(encoding="utf-8")
    assert "</script><b>" not in text
    assert set(page_data(r.html)["classes"]) == {"</script><b>x</b>", "a & 'b'"}


def test_bad_input_names_the_file(photos_table, tmp_path):
    junk = tmp_path / "notes.parquet"
    junk.write_text("not a table")
    with pytest.raises(FeatXError, match=re.escape(str(junk)) + ".*not a readable Parquet table"):
        plot_embeddings(junk, tmp_path)
    empty = write_table(tmp_path / "empty.parquet",
                        EmbeddingTable(paths=[], labels=[], keys=[], X=np.zeros((0, 8), np.float32), meta={"dim": 8}))
    with pytest.raises(FeatXError, match=re.escape(str(empty)) + ": the table has no rows"):
        plot_embeddings(empty, tmp_path)
    with pytest.raises(FeatXError, match="no such embeddings table"):
        plot_embeddings(tmp_path / "missing.parquet", tmp_path)
    with pytest.raises(FeatXError, match="unknown plot method 'mds'"):
        plot_embeddings(photos_table, tmp_path, method="mds")
    t = read_table(photos_table)
    few = EmbeddingTable(t.paths[:3], t.labels[:3], t.keys[:3], t.X[:3], {})
    with pytest.raises(FeatXError, match="tsne needs at least 5 points"):
        plot_embeddings(few, tmp_path, method="tsne")
    r = plot_embeddings(few, tmp_path, method="auto")  # too few for a neighbour map: PCA, said so
    assert r.method == "pca" and "too few" in r.notes[0]
    assert not list(tmp_path.glob("notes*.png")) and not list(tmp_path.glob("empty*.html"))


def test_cli_in_a_real_process(photos_table, tmp_path):
    out = tmp_path / "maps"
    p = subprocess.run([sys.executable, "-m", "featx.cli", "plot", str(photos_table), "--method", "pca",
                        "--out", str(out), "--max-points", "10", "--seed", "2"],
                       capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert p.returncode == 0, p.stderr
    assert f"png:  {out / 'photos.featx.pca.png'}" in p.stdout
    assert f"html: {out / 'photos.featx.pca.html'}" in p.stdout
    assert "pca map of 10 of 20 images, 2 classes" in p.stdout and "subsampled per class" in p.stdout
    assert (out / "photos.featx.pca.png").is_file() and len(page_data(out / "photos.featx.pca.html")["x"]) == 10
    r = CliRunner().invoke(main, ["plot", str(photos_table), "--method", "pca", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["points"] == 20 and json.loads(r.stdout)["method"] == "pca"
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"junk")
    p = subprocess.run([sys.executable, "-m", "featx.cli", "plot", str(bad)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 1 and f"error: {bad}: not a readable Parquet table" in p.stderr


# A stand-in for the browser: just enough DOM for the page's script, then a hover and a legend click.
_HARNESS = r"""
const fs = require('fs');
const [scriptFile, dataFile] = process.argv.slice(2);
const handlers = {}, els = {};
function el(id) {
  return els[id] = els[id] || {id, children: [], style: {}, innerHTML: '', width: 900, height: 720,
    textContent: id === 'featx-data' ? fs.readFileSync(dataFile, 'utf8') : '',
    classList: {toggle() {}},
    addEventListener(t, f) { (handlers[id] = handlers[id] || {})[t] = f; },
    appendChild(c) { this.children.push(c); },
    getContext() { return new Proxy({}, {get: (o, k) => k in o ? o[k] : () => {}, set: (o, k, v) => { o[k] = v; return true; }}); },
    getBoundingClientRect() { return {left: 0, top: 0, width: 900, height: 720}; }};
}
let made = 0;
global.document = {getElementById: el, createElement: () => el('legend-' + made++)};
global.window = {addEventListener() {}};
eval(fs.readFileSync(scriptFile, 'utf8'));
const D = JSON.parse(els['featx-data'].textContent);
const at = i => ({clientX: (D.x[i] + 0.05) / 1.1 * 900, clientY: 720 - (D.y[i] + 0.05) / 1.1 * 720});
const out = {};
handlers.map.mousemove(at(0));
out.first = els.tip.style.display === 'block' ? els.tip.innerHTML : '';
handlers['legend-' + D.c[0]].click();
handlers.map.mousemove(at(0));
out.hidden = els.tip.style.display === 'block' ? els.tip.innerHTML : '';
out.legend = made;
console.log(JSON.stringify(out));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's script")
def test_page_script_shows_the_hovered_image_and_hides_a_class(photos_table, tmp_path):
    r = plot_embeddings(photos_table, tmp_path, method="pca")
    text = r.html.read_text(encoding="utf-8")
    data = page_data(r.html)
    script = text.rsplit("<script>", 1)[1].split("</script>", 1)[0]
    (tmp_path / "page.js").write_text(script)
    (tmp_path / "data.json").write_text(json.dumps(data))
    (tmp_path / "harness.js").write_text(_HARNESS)
    p = subprocess.run(["node", str(tmp_path / "harness.js"), str(tmp_path / "page.js"), str(tmp_path / "data.json")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["legend"] == 2
    cls = data["classes"][data["c"][0]]
    assert data["path"][0] in out["first"] and f"<b>{cls}</b>" in out["first"]
    assert '<img src="data:image/jpeg;base64,' in out["first"]
    # its class hidden, the same spot shows a point of the other class (or nothing)
    assert data["path"][0] not in out["hidden"] and f"<b>{cls}</b>" not in out["hidden"]
