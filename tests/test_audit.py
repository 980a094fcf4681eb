"""featx audit (label issues, duplicates, outliers, the relabel page), the calibrated duplicate
threshold and fit-head --relabel, on real photos and the real default backbone."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featx.audit import audit
from featx.copy_threshold import ALTERATIONS, alter, calibrate_threshold, choose_threshold
from featx.embed.table import EmbeddingTable, read_table, write_table
from featx.errors import FeatXError
from featx.extract import extract
from featx.fit_table import fit_table
from featx.heads.oof import oof_proba
from featx.similarity import duplicates

from .helpers import run_cli

pytest.importorskip("cleanlab")

CHROMIUM = Path("/usr/bin/chromium")


def real_photos() -> dict[str, np.ndarray]:
    """Distinct real photos from scikit-image (offline): grey ones as they are."""
    import skimage.data as sd

    names = ("astronaut", "brick", "camera", "chelsea", "cell", "clock", "coffee", "coins", "grass",
             "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket",
             "text")
    return {n: getattr(sd, n)() for n in names}


def save(a: np.ndarray, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(a)).save(path, **kw)
    return path


def crops(a: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    h, w = a.shape[:2]
    out = []
    for i in range(n):
        ch, cw = int(h * rng.uniform(0.5, 0.8)), int(w * rng.uniform(0.5, 0.8))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        c = a[y:y + ch, x:x + cw]
        out.append(c[:, ::-1] if i % 2 else c)
    return out


# ---- the calibrated near-duplicate threshold -----------------------------------------------------

def test_choose_threshold_takes_the_middle_of_the_gap_or_keeps_the_false_pair_bound():
    distinct = np.linspace(0.1, 0.5, 1000).astype(np.float32)  # nearest-other similarities
    copies = np.linspace(0.7, 1.0, 100)
    t, met, why = choose_threshold(copies, distinct)
    assert met and 0.5 < t < 0.7 and "between" in why
    assert np.mean(distinct >= t) <= 0.001 and np.mean(copies >= t) >= 0.95
    t2, met2, why2 = choose_threshold(np.linspace(0.3, 1.0, 100), distinct)
    assert not met2 and "kept the false-pair bound" in why2
    assert np.sum(distinct >= t2) <= 1  # 0.1% of 1000
    with pytest.raises(FeatXError, match="no altered copy"):
        choose_threshold(np.array([]), distinct)


def test_alterations_make_copies():
    img = Image.fromarray(real_photos()["astronaut"])
    shapes = {how: alter(img, how).shape for how in ALTERATIONS}
    assert shapes["resize-aspect"] == (150, 200, 3)  # the issue's 512x512 -> 200x150
    assert shapes["crop-80"] == (410, 410, 3) and shapes["flip"] == (512, 512, 3)
    small = alter(Image.new("RGB", (28, 28)), "resize-aspect")
    assert small.shape == (28, 37, 3)  # a thumbnail is scaled up, not down


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, lite0) -> Path:
    """Seventeen distinct real photos, one folder each."""
    root = tmp_path_factory.mktemp("gallery")
    for name, a in real_photos().items():
        save(a, root / "data" / name / f"{name}.png")
    extract(root / "data", lite0, out=root / "gallery.featx.parquet")
    return root / "gallery.featx.parquet"


@pytest.fixture(scope="module")
def copies(tmp_path_factory, lite0) -> Path:
    """Copies of every gallery photo made as a user would, other than the calibration's own:
    the issue's 200x150 at JPEG 70, an 85% crop at JPEG 80, a mirrored half-size, brighter."""
    root = tmp_path_factory.mktemp("copies")
    for name, a in real_photos().items():
        im = Image.fromarray(a).convert("RGB")
        w, h = im.size
        save(np.asarray(im.resize((200, 150))), root / "data" / name / "small.jpg", quality=70)
        save(np.asarray(im.crop((w // 14, h // 14, w - w // 14, h - h // 14))), root / "data" / name / "crop.jpg",
             quality=80)
        save(np.asarray(im.resize((w // 2, h // 2)))[:, ::-1], root / "data" / name / "mirror.png")
        save(np.clip(np.asarray(im).astype(int) + 25, 0, 255).astype(np.uint8), root / "data" / name / "bright.png")
    extract(root / "data", lite0, out=root / "copies.featx.parquet")
    return root / "copies.featx.parquet"


def test_calibrated_threshold_finds_altered_copies_and_no_false_pairs(gallery, copies):
    t = read_table(gallery)
    c = calibrate_threshold(t, name=str(gallery))
    assert c.met, c.reason
    assert c.recall >= 0.95 and c.false_rate == 0.0 and c.copies == 17 * len(ALTERATIONS)
    r = duplicates(gallery, across=copies, threshold="auto")
    assert r.calibration is not None and r.threshold == pytest.approx(c.threshold)
    u = read_table(copies)
    found = {(t.labels[a], u.paths[b]) for a, b in zip(r.a.tolist(), r.b.tolist(), strict=True)}
    false = [(a, b) for a, b in found if b.split("/")[0] != a]
    # false pairs: at most 0.1% of the copy x photo pairs (here 1 of 1,156: a degraded copy of
    # gravel pairs with grass, two ground textures)
    assert len(false) <= 0.001 * len(u) * len(t)
    assert len(found) >= 0.95 * len(u)  # >= 95% of 68 copies found
    # the fixed 0.95 misses the issue's example (200x150 at JPEG 70) of most photos
    fixed = duplicates(gallery, across=copies, threshold=0.95)
    small_fixed = sum(u.paths[b].endswith("small.jpg") for b in fixed.b.tolist())
    small_auto = sum(p.endswith("small.jpg") for _, p in found)
    assert small_auto >= 16 and small_fixed < small_auto


def test_cli_duplicates_prints_the_calibrated_threshold(gallery, copies):
    r = run_cli("duplicates", str(gallery), "--across", str(copies), "-q")
    assert "calibrated on" in r.output and "altered copies found" in r.output
    r2 = run_cli("duplicates", str(gallery), "--across", str(copies), "--threshold", "0.99", "-q")
    assert "calibrated" not in r2.output and "cosine >= 0.99" in r2.output


# ---- audit ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dataset(tmp_path_factory, lite0) -> tuple[Path, dict]:
    """Three classes of real photo crops (cat, coffee, rocket), 8 each, with one cat crop filed
    under rocket (a wrong label) and one unrelated photo (the moon) filed under coffee."""
    root = tmp_path_factory.mktemp("audit")
    p = real_photos()
    for label, src, seed in (("cat", "chelsea", 1), ("coffee", "coffee", 2), ("rocket", "rocket", 3)):
        for i, c in enumerate(crops(p[src], 8, seed)):
            save(c, root / "data" / label / f"{src}_{i}.jpg", quality=90)
    save(crops(p["chelsea"], 9, 7)[8], root / "data" / "rocket" / "stray_cat.jpg", quality=90)
    save(p["moon"], root / "data" / "coffee" / "moon.png")
    extract(root / "data", lite0, out=root / "t.featx.parquet")
    planted = {"wrong": "rocket/stray_cat.jpg", "outlier": "coffee/moon.png"}
    return root / "t.featx.parquet", planted


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def under(table: Path, path: str) -> str:
    """A CSV's path (absolute, as every featx output writes it) under the table's data folder."""
    return Path(path).relative_to(table.parent.resolve() / "data").as_posix()


def test_audit_finds_the_wrong_label_and_the_outlier(dataset, tmp_path):
    table, planted = dataset
    r = audit(table, out_dir=tmp_path / "out")
    names = sorted(f.name for f in r.files)
    assert names == ["audit.html", "audit.json", "duplicates.csv", "label_issues.csv", "outliers.csv"]
    issues = read_csv(tmp_path / "out" / "label_issues.csv")
    assert under(table, issues[0]["path"]) == planted["wrong"]
    assert (issues[0]["given"], issues[0]["suggested"], issues[0]["flagged"]) == ("rocket", "cat", "True")
    assert [int(x["rank"]) for x in issues] == list(range(1, 27))
    outs = read_csv(tmp_path / "out" / "outliers.csv")
    assert under(table, outs[0]["path"]) == planted["outlier"] and outs[0]["flagged"] == "True"
    summary = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert summary["rows"] == 26 and summary["label_issues"] >= 1
    assert summary["threshold"]["calibration"]["copies"] == 26 * len(ALTERATIONS)
    page = (tmp_path / "out" / "audit.html").read_text()
    assert "data:image/jpeg;base64," in page and "stray_cat.jpg" in page


def test_audit_after_relabel_shows_the_issue_gone(dataset, tmp_path):
    table, planted = dataset
    rel = write_relabel(tmp_path / "relabel.csv", [(planted["wrong"], "relabel", "cat"),
                                                  (planted["outlier"], "drop", "")])
    r = run_cli("audit", str(table), "--relabel", str(rel), "--out", str(tmp_path / "out"),
                "--threshold", "0.99", "-q")
    assert "25 images, 3 classes" in r.output and "1 relabelled, 1 dropped" in r.output
    issues = read_csv(tmp_path / "out" / "label_issues.csv")
    fixed = next(x for x in issues if under(table, x["path"]) == planted["wrong"])
    assert fixed["given"] == "cat" and fixed["flagged"] == "False"
    assert planted["outlier"] not in {under(table, x["path"]) for x in read_csv(tmp_path / "out" / "outliers.csv")}


def test_oof_probabilities_never_saw_their_row(dataset):
    t = read_table(dataset[0])
    r = oof_proba(t.X, t.labels)
    assert r.proba.shape == (26, 3) and np.allclose(r.proba.sum(1), 1.0)
    wrong = t.paths.index(dataset[1]["wrong"])
    assert r.classes[int(r.proba[wrong].argmax())] == "cat"  # a model that saw it would say rocket
    assert r.C in [g["C"] for g in r.grid] and r.folds == 5


def test_neighbour_vote_never_counts_the_row_itself():
    from featx.audit.labels import knn_proba

    index = np.array([[0, 1, 2], [1, 0, 2], [2, 1, 0]])  # each row finds itself first
    codes = np.array([0, 1, 1])
    P = knn_proba(index, codes, 2, k=2)
    assert np.allclose(P.sum(1), 1.0)
    assert P[0].argmax() == 1  # its two others are class 1
    assert np.allclose(P[1], P[2])  # each sees one 0 and one 1


def test_audit_page_escapes_names(tmp_path, lite0):
    data = tmp_path / "data"
    p = real_photos()
    for label, src in (("<b>cat</b>", "chelsea"), ("thing", "coffee")):
        for i, c in enumerate(crops(p[src], 3, 5)):
            save(c, data / label / f"x'\"<i>{i}.png")
    extract(data, lite0, out=tmp_path / "t.featx.parquet")
    audit(tmp_path / "t.featx.parquet", out_dir=tmp_path / "out", threshold=0.99)
    page = (tmp_path / "out" / "audit.html").read_text()
    assert "<b>cat</b>" not in page and "<i>" not in page
    assert "&lt;b&gt;cat&lt;/b&gt;" in page


# ---- refused input: one line, nothing written --------------------------------------------------

def _variant(table: Path, dest: Path, **change) -> Path:
    t = read_table(table)
    X = t.X.copy()
    labels = list(t.labels)
    meta = dict(t.meta)
    if change.get("nan"):
        X[3, 5] = np.nan
    if change.get("lonely"):
        labels[0] = "unicorn"
    if change.get("fingerprint"):
        meta["fingerprint"] = "0" * 16
    return write_table(dest, EmbeddingTable(t.paths, labels, t.keys, X, meta))


@pytest.mark.parametrize("change, message", [
    ("nan", r"1 of \d+ rows have NaN or infinite embeddings"),
    ("lonely", r"class 'unicorn' has a single image"),
    ("fingerprint", r"different backbones are not comparable"),
])
def test_refused_input_writes_nothing(dataset, tmp_path, change, message):
    table = dataset[0]
    bad = _variant(table, tmp_path / "bad.featx.parquet", **{change: True})
    args = (["audit", str(table), "--test", str(bad)] if change == "fingerprint"
            else ["audit", str(bad)]) + ["--out", str(tmp_path / "out"), "-q"]
    r = run_cli(*args, ok=False)
    assert r.exit_code == 1
    lines = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and re.search(message, lines[0]), r.output
    assert not (tmp_path / "out").exists()


# ---- fit-head --relabel -------------------------------------------------------------------------

def write_relabel(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["path", "action", "label"])
    w.writerows(rows)
    path.write_text(buf.getvalue())
    return path


def test_fit_head_relabel_records_the_changes(dataset, tmp_path):
    table, planted = dataset
    rel = write_relabel(tmp_path / "relabel.csv", [(planted["wrong"], "relabel", "cat"),
                                                  (planted["outlier"], "drop", "")])
    r = run_cli("fit-head", "--embeddings", str(table), "--relabel", str(rel), "--out",
                str(tmp_path / "head.featx"), "--C", "1.0", "-q")
    assert "1 relabelled, 1 dropped" in r.output
    rep = json.loads((tmp_path / "head.featx.report.json").read_text())
    assert rep["relabel"]["changes"] == [{"path": planted["wrong"], "from": "rocket", "to": "cat"}]
    assert rep["relabel"]["dropped_paths"] == [planted["outlier"]]
    assert rep["class_counts"] == {"cat": 9, "coffee": 8, "rocket": 8} and rep["n_train"] == 25
    card = (tmp_path / "head.README.md").read_text()
    assert "corrections" in card and "1 relabelled, 1 dropped" in card


@pytest.mark.parametrize("rows, message", [
    ([("nowhere/x.png", "drop", "")], r"1 path\(s\) not in .*'nowhere/x.png' \(row 2\)"),
    ([("rocket/stray_cat.jpg", "relabel", "dog")], r"row 2: 'dog' is not a class of .*cat, coffee, rocket"),
    ([("rocket/stray_cat.jpg", "move", "")], r"row 2: action 'move'"),
    ([("rocket/stray_cat.jpg", "drop", ""), ("rocket/stray_cat.jpg", "relabel", "cat")],
     r"listed twice with different wishes"),
])
def test_bad_relabel_file_is_one_line_and_writes_no_head(dataset, tmp_path, rows, message):
    rel = write_relabel(tmp_path / "relabel.csv", rows)
    head = tmp_path / "head.featx"
    r = run_cli("fit-head", "--embeddings", str(dataset[0]), "--relabel", str(rel), "--out", str(head),
                "--C", "1.0", "-q", ok=False)
    assert r.exit_code == 1
    lines = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and re.search(message, lines[0]), r.output
    assert not head.exists()
    with pytest.raises(FeatXError):
        fit_table(dataset[0], relabel=rel, out=head, C=1.0)


# ---- the page in a real browser ----------------------------------------------------------------

def test_page_picks_download_relabel_and_refit(dataset, tmp_path):
    """Pick two corrections in audit.html in headless chromium, download relabel.csv, refit."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip(f"no system chromium at {CHROMIUM} (Debian package chromium)")
    table, planted = dataset
    out = tmp_path / "out"
    run_cli("audit", str(table), "--out", str(out), "--threshold", "0.99", "-q")
    # a second, ordinary image: relabel a coffee crop to rocket
    other = "coffee/coffee_0.jpg"
    data = table.parent.resolve() / "data"  # the page names files absolute, as the CSVs do
    wrong_file, other_file = str(data / planted["wrong"]), str(data / other)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=["--no-sandbox"])
        try:
            page = browser.new_page(accept_downloads=True)
            page.goto((out / "audit.html").as_uri())
            page.locator(f"select.fix[data-path='{wrong_file}']").first.select_option("relabel:cat")
            page.locator(f"select.fix[data-path='{other_file}']").first.select_option("relabel:rocket")
            # the same image in another section follows the choice
            synced = page.locator(f"select.fix[data-path='{wrong_file}']")
            assert all(v == "relabel:cat" for v in synced.evaluate_all("els => els.map(e => e.value)"))
            assert page.locator("#count").inner_text() == "2 image(s) chosen"
            with page.expect_download() as dl:
                page.click("#download")
            assert dl.value.suggested_filename == "relabel.csv"
            rel = tmp_path / "relabel.csv"
            dl.value.save_as(rel)
        finally:
            browser.close()
    assert read_csv(rel) == [{"path": wrong_file, "action": "relabel", "label": "cat"},
                             {"path": other_file, "action": "relabel", "label": "rocket"}]
    r = fit_table(table, relabel=rel, out=tmp_path / "head.featx", C=1.0)
    changes = {(c["path"], c["from"], c["to"]) for c in r.report["relabel"]["changes"]}
    assert changes == {(planted["wrong"], "rocket", "cat"), (other, "coffee", "rocket")}
    assert r.report["class_counts"] == {"cat": 9, "coffee": 8, "rocket": 9}
    shutil.rmtree(out)
