"""featx suggest (featx.suggest): real Fashion-MNIST PNGs, the real default backbone."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from featx.embed.table import read_table, write_table
from featx.errors import FeatXError, MismatchError
from featx.extract import extract
from featx.suggest import CANDIDATES_PER_PICK, margins, select, suggest, write_suggestions

from .helpers import fashion_mnist_folder, needs_fashion_mnist, run_cli

pytestmark = needs_fashion_mnist


@pytest.fixture(scope="module")
def loop(tmp_path_factory, featx_home):
    """A labelled folder (4 a class), its table, and an unlabelled pool folder (12 a class,
    flattened: no class folders) holding a renamed copy of a labelled image."""
    root = tmp_path_factory.mktemp("suggest")
    train = fashion_mnist_folder(root / "train", "train", 4)
    pool_src = fashion_mnist_folder(root / "pool_src", "test", 12)
    pool = root / "pool"
    pool.mkdir()
    for f in sorted(pool_src.rglob("*.png")):
        shutil.copy(f, pool / f"{f.parent.name}_{f.name}")
    labelled_file = sorted(train.rglob("*.png"))[0]
    shutil.copy(labelled_file, pool / "renamed_copy_of_a_labelled_image.png")
    table = extract(train, out=root / "train.featx.parquet").out
    return {"root": root, "train": train, "pool": pool, "table": table}


def test_suggest_folder_pool_writes_csv_and_to_label(loop, tmp_path):
    r = suggest(loop["pool"], loop["table"], 5, seed=1)
    assert r.pool_size == 37 and r.already_labelled == 1 and r.labelled == 12
    assert len(r.rows) == 5 and [row["rank"] for row in r.rows] == [1, 2, 3, 4, 5]
    assert all("copy_of_a_labelled" not in row["path"] for row in r.rows)
    # margin, best first: the smallest margins, in order
    ms = [row["margin"] for row in r.rows]
    assert ms == sorted(ms)
    write_suggestions(r, tmp_path / "round1" / "next.csv")
    with open(tmp_path / "round1" / "next.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["path"] for row in rows] == [row["path"] for row in r.rows]
    assert all(row["label"] == "" and row["reason"].startswith("low margin") for row in rows)
    to_label = tmp_path / "round1" / "to_label"
    copies = sorted(p for p in to_label.iterdir() if p.is_file())
    assert len(copies) == 5 and copies[0].name.startswith("0001_")
    assert sorted(d.name for d in to_label.iterdir() if d.is_dir()) == sorted(r.classes)
    # the copies are the same bytes: extracting them is all cache hits (embedded with the pool)
    res = extract(to_label, write=False)
    assert res.stats.cached == 5 and res.stats.embedded == 0
    # or fill next.csv's label column: it is a listing extract reads (absolute paths), all cached
    for row in rows:
        row["label"] = row["predicted"]
    filled = tmp_path / "round1" / "labelled.csv"
    with open(filled, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    res = extract(filled, write=False)
    assert res.stats.cached == 5 and res.table.labels == [row["predicted"] for row in rows]


def test_suggest_is_seeded_and_never_repeats_labelled_content(loop):
    for strategy in ("margin", "entropy", "margin+diversity", "margin+coreset", "random"):
        a = suggest(loop["pool"], loop["table"], 6, strategy=strategy, seed=3)
        b = suggest(loop["pool"], loop["table"], 6, strategy=strategy, seed=3)
        assert [r["path"] for r in a.rows] == [r["path"] for r in b.rows], strategy
        assert len({r["key"] for r in a.rows}) == 6
        assert not {r["key"] for r in a.rows} & set(read_table(loop["table"]).keys)


def test_suggest_pool_as_table_matches_folder(loop, tmp_path):
    pool_table = extract(loop["pool"], out=tmp_path / "pool.featx.parquet").out
    a = suggest(loop["pool"], loop["table"], 4, seed=0)
    b = suggest(pool_table, loop["table"], 4, seed=0)
    assert [Path(r["path"]).name for r in a.rows] == [Path(r["path"]).name for r in b.rows]
    assert Path(b.rows[0]["path"]).is_file()  # the table's relative paths resolved to the files


def test_select_margin_entropy_random():
    proba = np.array([[0.9, 0.1, 0.0], [0.5, 0.45, 0.05], [0.34, 0.33, 0.33], [0.6, 0.2, 0.2]])
    assert list(select(proba, 2, "margin")[0]) == [2, 1]
    assert list(select(proba, 1, "entropy")[0]) == [2]
    r1, r2 = select(proba, 3, "random", seed=5)[0], select(proba, 3, "random", seed=5)[0]
    assert list(r1) == list(r2) and len(set(r1)) == 3
    assert np.allclose(margins(proba), [0.8, 0.05, 0.01, 0.4])
    with pytest.raises(FeatXError, match="cannot choose 5 of 4"):
        select(proba, 5)


def test_diversity_spreads_picks_that_margin_bunches():
    """Twenty near copies are the least certain; margin takes four of them, the diverse
    strategies take one of them and the next most uncertain images elsewhere."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16))
    X = np.concatenate([centres[0] + 0.001 * rng.normal(size=(20, 16))] +
                       [c + 0.001 * rng.normal(size=(4, 16)) for c in centres[1:]])
    m = np.concatenate([np.full(20, 0.01), np.linspace(0.05, 0.2, 16)])  # margins
    proba = np.stack([(1 + m) / 2, (1 - m) / 2], axis=1)
    assert len(X) <= CANDIDATES_PER_PICK * 4  # every image is a candidate
    picked = select(proba, 4, "margin", X=X)[0]
    assert set(picked) <= set(range(20))
    for strategy in ("margin+diversity", "margin+coreset"):
        picked = select(proba, 4, strategy, X=X, seed=0)[0]
        groups = {0 if i < 20 else 1 + (i - 20) // 4 for i in picked}
        assert len(groups) == 4, (strategy, picked)


def test_errors_one_clear_line(loop, tmp_path):
    table = loop["table"]
    # a pool from another backbone: the same table under another fingerprint
    t = read_table(table)
    t.meta = {**t.meta, "fingerprint": "0123456789abcdef"}
    other = write_table(tmp_path / "other.featx.parquet", t)
    with pytest.raises(MismatchError, match="another backbone"):
        suggest(other, table, 2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FeatXError, match="no readable images"):
        suggest(empty, table, 2)
    with pytest.raises(FeatXError, match="all 12 images are already in"):
        suggest(loop["train"], table, 2)
    with pytest.raises(FeatXError, match="-n 99 is more than the 36 unlabelled images"):
        suggest(loop["pool"], table, 99)
    lonely = tmp_path / "lonely"
    shutil.copytree(loop["train"], lonely)
    cls = sorted(d for d in lonely.iterdir())[0]
    for f in sorted(cls.iterdir())[1:]:
        f.unlink()
    lonely_table = extract(lonely, out=tmp_path / "lonely.featx.parquet").out
    with pytest.raises(FeatXError, match=f"class {cls.name} has one image"):
        suggest(loop["pool"], lonely_table, 2)
    r = run_cli("suggest", str(loop["pool"]), "--labelled", str(table), "-n", "99",
                "--out", str(tmp_path / "x.csv"), ok=False)
    assert r.exit_code == 1
    assert r.output.strip().count("\n") == 0 and r.output.startswith("error: -n 99 is more than")
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "to_label").exists()


def test_cli_round_and_refusal_to_overwrite_to_label(loop, tmp_path):
    out = tmp_path / "next.csv"
    r = run_cli("suggest", str(loop["pool"]), "-l", str(loop["table"]), "-n", "3", "--out", str(out),
                "--strategy", "margin+diversity", "-q")
    assert "3 of 37 pool images to label" in r.output and out.is_file()
    r = run_cli("suggest", str(loop["pool"]), "-l", str(loop["table"]), "-n", "3", "--out", str(out),
                ok=False)
    assert r.exit_code == 1 and "already holds files" in r.output
    r = run_cli("suggest", str(loop["pool"]), "-l", str(loop["table"]), "-n", "2", "--out",
                str(tmp_path / "b" / "next.tsv"), "--layout", "none", "--json")
    assert '"suggested": 2' in r.output and not (tmp_path / "b" / "to_label").exists()


def test_head_file_of_the_table_gives_the_same_choice(loop, tmp_path):
    from featx.fit_table import fit_table

    head = fit_table(loop["table"], out=tmp_path / "head.featx").head_file
    fitted = suggest(loop["pool"], loop["table"], 5, seed=0)
    given = suggest(loop["pool"], loop["table"], 5, seed=0, head=head)
    assert [r["path"] for r in given.rows] == [r["path"] for r in fitted.rows]
    assert given.head["C"] == fitted.head["C"]
