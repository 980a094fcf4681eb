"""featx neighbors / duplicates (featx.similarity) on real photos and the real default backbone."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featx.errors import FeatXError, MismatchError
from featx.extract import extract
from featx.similarity import (
    DEFAULT_THRESHOLD,
    EXACT_MAX_ROWS,
    choose_index,
    duplicates,
    exact_topk,
    neighbors,
    normalize,
    search,
)

from .helpers import photos

try:
    import hnswlib  # noqa: F401

    HAVE_HNSW = True
except ImportError:
    HAVE_HNSW = False
needs_hnswlib = pytest.mark.skipif(not HAVE_HNSW, reason="hnswlib (featx's 'ann' extra) is not installed")

# skimage's cat() and chelsea() are the same photo: keep one
DISTINCT = ("chelsea", "coffee", "astronaut", "rocket", "camera")


def save(a: np.ndarray, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(a)).save(path, **kw)
    return path


def crop(a: np.ndarray, keep: float) -> np.ndarray:
    h, w = a.shape[:2]
    dy, dx = int(h * (1 - keep) / 2), int(w * (1 - keep) / 2)
    return a[dy:h - dy, dx:w - dx]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "featx.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, lite0) -> Path:
    """The five distinct photos, one a class folder each, extracted: ``gallery.featx.parquet``."""
    root = tmp_path_factory.mktemp("gallery")
    p = photos()
    for name in DISTINCT:
        save(p[name], root / "data" / name / f"{name}.png")
    extract(root / "data", lite0, out=root / "gallery.featx.parquet")
    return root / "gallery.featx.parquet"


@pytest.fixture(scope="module")
def queries(tmp_path_factory) -> Path:
    """Altered copies of three gallery photos: flipped, cropped to 85%, flipped + cropped JPEG."""
    root = tmp_path_factory.mktemp("queries")
    p = photos()
    save(p["chelsea"][:, ::-1], root / "chelsea_flipped.png")
    save(crop(p["astronaut"], 0.85), root / "astronaut_cropped.png")
    save(crop(p["coffee"], 0.9)[:, ::-1], root / "coffee_flip_crop.jpg", quality=85)
    return root


def name_of(path: str) -> str:
    return Path(path).stem


# ---- neighbours --------------------------------------------------------------------------------

def test_altered_copy_finds_its_original_first(gallery, queries):
    r = neighbors(queries, gallery, k=3)
    top1 = {name_of(q): name_of(r.paths[r.search.index[i, 0]]) for i, q in enumerate(r.query_files)}
    assert top1 == {"chelsea_flipped": "chelsea", "astronaut_cropped": "astronaut",
                    "coffee_flip_crop": "coffee"}
    assert r.search.method == "exact" and r.k == 3
    assert np.all(np.diff(r.search.similarity, axis=1) <= 0)  # nearest first
    # the original is much closer than any other photo
    assert np.all(r.search.similarity[:, 0] > 0.85) and np.all(r.search.similarity[:, 1] < 0.6)
    assert r.labels[r.search.index[0, 0]] == name_of(r.paths[r.search.index[0, 0]])


def test_query_table_searches_without_embedding_again(gallery):
    r = neighbors(gallery, gallery, k=2)
    assert [name_of(p) for p in r.query_files] == [name_of(p) for p in r.paths]
    assert list(r.search.index[:, 0]) == list(range(len(r.paths)))  # each finds itself
    assert np.allclose(r.search.similarity[:, 0], 1.0, atol=1e-5)


def test_blocked_exact_search_equals_brute_force():
    rng = np.random.default_rng(0)
    X, Q = normalize(rng.normal(size=(500, 24))), normalize(rng.normal(size=(70, 24)))
    X[7] = X[3]  # an exact tie: the lower row comes first
    Q[5] = X[3]
    idx, sim = exact_topk(Q, X, 5, budget=4 * 500 * 3)  # 3 query rows per block: 24 blocks
    S = Q @ X.T
    want = np.argsort(-S, axis=1, kind="stable")[:, :5]
    assert np.array_equal(idx, want)
    assert np.allclose(sim, np.take_along_axis(S, want, axis=1))
    assert list(idx[5, :2]) == [3, 7]
    idx_all, _ = exact_topk(Q, X, 10_000)  # k above the row count: every row, ordered
    assert idx_all.shape == (70, 500) and np.array_equal(idx_all[:, :5], want)


@needs_hnswlib
def test_exact_and_approx_agree_and_recall_is_reported(gallery, queries):
    ex = neighbors(queries, gallery, k=3, index="exact")
    ap = neighbors(queries, gallery, k=3, index="approx")
    assert ap.search.method == "approx"
    assert list(ap.search.index[:, 0]) == list(ex.search.index[:, 0])
    assert np.allclose(ap.search.similarity, ex.search.similarity, atol=1e-4)
    assert ap.search.recall == pytest.approx(1.0) and ap.search.recall_queries == 3
    assert ex.search.recall is None


@needs_hnswlib
def test_approx_recall_is_measured_not_assumed():
    # a deliberately starved index (ef=1 on uniform data) must report recall below 1
    rng = np.random.default_rng(1)
    X = rng.normal(size=(3000, 32)).astype(np.float32)
    good = search(X[:300], X, 10, index="approx", ef=200)
    assert good.recall > 0.95
    from featx.similarity import approx_topk, hnsw_index, recall_at_k

    index = hnsw_index(normalize(X), M=2, ef_construction=10)
    _, sim = approx_topk(index, normalize(X[:300]), 10, ef=1)
    _, ex_sim = exact_topk(normalize(X[:300]), normalize(X), 10)
    assert recall_at_k(sim, ex_sim) <= 1.0
    assert recall_at_k(ex_sim[:, ::-1] * 0 - 1, ex_sim) == 0.0  # nothing found: recall 0


def test_auto_index_choice():
    assert choose_index("auto", 10) == ("exact", "")
    method, note = choose_index("auto", EXACT_MAX_ROWS + 1)
    if HAVE_HNSW:
        assert method == "approx"
    else:
        assert method == "exact" and "ann" in note
    with pytest.raises(FeatXError, match="index must be one of"):
        choose_index("faiss", 10)


# ---- duplicates --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def planted(tmp_path_factory, lite0) -> Path:
    """The distinct photos plus a byte copy of coffee and a JPEG quality-60 re-encoding of astronaut."""
    root = tmp_path_factory.mktemp("planted")
    p = photos()
    for name in DISTINCT:
        save(p[name], root / "data" / f"{name}.png")
    shutil.copy(root / "data" / "coffee.png", root / "data" / "coffee_copy.png")
    save(p["astronaut"], root / "data" / "astronaut_q60.jpg", quality=60)
    extract(root / "data", lite0, out=root / "planted.featx.parquet")
    return root / "planted.featx.parquet"


def test_planted_copies_are_the_only_duplicates(planted):
    r = duplicates(planted)
    pairs = {frozenset((name_of(x["path_a"]), name_of(x["path_b"]))): x for x in r.rows()}
    assert set(pairs) == {frozenset(("coffee", "coffee_copy")), frozenset(("astronaut", "astronaut_q60"))}
    assert pairs[frozenset(("coffee", "coffee_copy"))]["identical"] is True
    assert pairs[frozenset(("coffee", "coffee_copy"))]["similarity"] == pytest.approx(1.0, abs=1e-5)
    q60 = pairs[frozenset(("astronaut", "astronaut_q60"))]
    assert q60["identical"] is False and DEFAULT_THRESHOLD <= q60["similarity"] < 1.0
    assert sorted(len(c) for c in r.clusters) == [2, 2]
    s = r.summary()
    assert (s["pairs"], s["identical_pairs"], s["clusters"], s["capped"]) == (2, 1, 2, 0)


def test_byte_copies_are_clustered_beyond_per_image(tmp_path, lite0):
    p = photos()
    for name in ("rocket", "camera"):
        save(p[name], tmp_path / "data" / f"{name}.png")
    for i in range(3):
        shutil.copy(tmp_path / "data" / "rocket.png", tmp_path / "data" / f"rocket_{i}.png")
    t = extract(tmp_path / "data", lite0, out=tmp_path / "t.featx.parquet").table
    r = duplicates(t, per_image=1)  # the search lists one copy per image; the keys pair the rest
    assert len(r.clusters) == 1 and len(r.clusters[0]) == 4
    assert {name_of(m["path"]) for m in r.cluster_rows()[0]} == {"rocket", "rocket_0", "rocket_1", "rocket_2"}
    assert r.identical.all() and r.capped == 4


@pytest.fixture(scope="module")
def split(tmp_path_factory, lite0) -> tuple[Path, Path]:
    """Labelled train (chelsea, coffee, rocket) and test (astronaut, camera + coffee leaked as
    a re-encoded JPEG under another label)."""
    root = tmp_path_factory.mktemp("split")
    p = photos()
    save(p["chelsea"], root / "train" / "cat" / "chelsea.png")
    save(p["coffee"], root / "train" / "thing" / "coffee.png")
    save(p["rocket"], root / "train" / "thing" / "rocket.png")
    save(p["astronaut"], root / "test" / "person" / "astronaut.png")
    save(p["camera"], root / "test" / "person" / "camera.png")
    save(p["coffee"], root / "test" / "person" / "coffee_leaked.jpg", quality=90)
    extract(root / "train", lite0, out=root / "train.featx.parquet")
    extract(root / "test", lite0, out=root / "test.featx.parquet")
    return root / "train.featx.parquet", root / "test.featx.parquet"


def test_across_finds_exactly_the_leaked_image(split):
    train, test = split
    r = duplicates(train, across=test)
    assert [(name_of(x["path_a"]), name_of(x["path_b"])) for x in r.rows()] == [("coffee", "coffee_leaked")]
    row = r.rows()[0]
    assert (row["label_a"], row["label_b"], row["identical"]) == ("thing", "person", False)
    assert (r.leaked, r.leaked_other_label) == (1, 1)
    assert r.clusters == [[("table", 1), ("across", 2)]]
    assert r.summary()["across_rows"] == 3
    within = duplicates(train)  # no copies inside the training set
    assert len(within) == 0 and within.clusters == []


def test_threshold_is_checked(planted):
    with pytest.raises(FeatXError, match="between -1 and 1"):
        duplicates(planted, threshold=1.5)


# ---- a different backbone is refused ----------------------------------------------------------

@pytest.fixture(scope="module")
def other_backbone_table(tmp_path_factory, lite0, queries) -> Path:
    """The query photos extracted with another decoder: the same network, another fingerprint."""
    pytest.importorskip("simplejpeg")
    out = tmp_path_factory.mktemp("other") / "q.featx.parquet"
    r = extract(queries, lite0, out=out, decoder="simplejpeg")
    assert r.table.fingerprint != lite0.fingerprint
    return out


def test_backbone_mismatch_is_refused(gallery, split, other_backbone_table, queries, lite0):
    from featx.backbones.artifact import with_decoder

    with pytest.raises(MismatchError, match="different backbones are not comparable"):
        neighbors(other_backbone_table, gallery, k=2)
    with pytest.raises(MismatchError, match="different backbones are not comparable"):
        duplicates(split[0], across=other_backbone_table)
    with pytest.raises(MismatchError, match="fingerprint"):
        neighbors(queries, gallery, k=2, backbone=with_decoder(lite0, "simplejpeg"))


# ---- the CLI -----------------------------------------------------------------------------------

def test_cli_neighbors_prints_and_writes(gallery, queries, tmp_path):
    out = tmp_path / "n.csv"
    r = cli("neighbors", str(queries / "chelsea_flipped.png"), "--in", str(gallery), "-k", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1].endswith("chelsea_flipped.png")
    assert lines[2].split()[0] == "1" and lines[2].rstrip().endswith("chelsea.png")
    assert "index: exact" in r.stdout
    rows = list(csv.DictReader(out.open()))
    assert [row["rank"] for row in rows] == ["1", "2"]
    assert name_of(rows[0]["path"]) == "chelsea" and rows[0]["label"] == "chelsea"
    assert float(rows[0]["similarity"]) > float(rows[1]["similarity"])


@needs_hnswlib
def test_cli_neighbors_approx_prints_recall(gallery, queries):
    r = cli("neighbors", str(queries), "--in", str(gallery), "-k", "2", "--index", "approx", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["index"] == "approx" and doc["recall"] == pytest.approx(1.0)
    r = cli("neighbors", str(queries), "--in", str(gallery), "-k", "2", "--index", "approx", "-q")
    assert "recall@k against exact search 1.0000 on 3 sampled queries" in r.stdout


def test_cli_duplicates_across_reports_leakage(split, tmp_path):
    train, test = split
    out = tmp_path / "d.json"
    r = cli("duplicates", str(train), "--across", str(test), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "leakage: 1 of 3 images" in r.stdout and "1 of them with another label" in r.stdout
    doc = json.loads(out.read_text())
    assert (doc["pairs"], doc["leaked"], doc["leaked_other_label"]) == (1, 1, 1)
    assert doc["clusters"] == 1 and len(doc["duplicates"]) == 1
    assert [name_of(m["path"]) for m in doc["groups"][0]] == ["coffee", "coffee_leaked"]
    assert [m["side"] for m in doc["groups"][0]] == ["table", "across"]


def test_cli_duplicates_within_csv(planted, tmp_path):
    out = tmp_path / "d.csv"
    r = cli("duplicates", str(planted), "--out", str(out), "--threshold", "0.9")
    assert r.returncode == 0, r.stderr
    assert "2 near-duplicate pair(s) at cosine >= 0.9" in r.stdout
    rows = list(csv.DictReader(out.open()))
    assert rows[0]["identical"] == "True" and {name_of(rows[0]["path_a"]), name_of(rows[0]["path_b"])} == {
        "coffee", "coffee_copy"}


def test_cli_refuses_mismatch_with_one_line(gallery, other_backbone_table):
    r = cli("neighbors", str(other_backbone_table), "--in", str(gallery))
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and "different backbones are not comparable" in r.stderr
    assert "Traceback" not in r.stderr
