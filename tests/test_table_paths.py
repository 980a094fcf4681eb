"""One rule for where a table row's image is (featx.embed.table.image_paths): the data root the
table records, else the table's own folder. neighbours and duplicates read a table without a
recorded root relative to the current directory before; plot and suggest relative to the table."""

from __future__ import annotations

import os
from pathlib import Path

from featx.embed.table import EmbeddingTable, image_paths, read_table, write_table
from featx.extract import extract
from featx.similarity import duplicates, neighbors

from .helpers import make_image_folder


def _rootless(lite0, tmp_path) -> Path:
    data = make_image_folder(tmp_path / "data", per_class=2)
    t = extract(data, lite0, out=tmp_path / "t.featx.parquet", store=tmp_path / "s", device="cpu").table
    assert all(not os.path.isabs(p) for p in t.paths)
    meta = {k: v for k, v in t.meta.items() if k != "root"}
    # written by hand beside the images, paths relative to its folder, no root recorded
    return write_table(data / "hand.featx.parquet", EmbeddingTable(t.paths, t.labels, t.keys, t.X, meta))


def test_a_table_without_a_root_is_read_relative_to_its_folder(lite0, tmp_path, monkeypatch):
    table = _rootless(lite0, tmp_path)
    monkeypatch.chdir(tmp_path)  # not the table's folder
    want = [str(table.parent / p) for p in read_table(table).paths]
    assert all(Path(f).is_file() for f in want)
    assert image_paths(read_table(table), table) == want
    assert neighbors(table, table, k=1).paths == want
    assert neighbors(table, table, k=1).query_files == want
    d = duplicates(table, across=table, threshold=0.99)
    assert d.paths == want and d.across_paths == want


def test_the_recorded_root_wins_and_memory_tables_keep_their_paths(lite0, tmp_path):
    t = EmbeddingTable(["a/x.png", "/abs/y.png"], ["a", "b"], ["k1", "k2"], None, {"root": str(tmp_path)})
    assert image_paths(t, tmp_path / "elsewhere" / "t.parquet") == [str(tmp_path / "a/x.png"), "/abs/y.png"]
    listing = tmp_path / "list.csv"
    listing.write_text("path\na/x.png\n")
    t.meta["root"] = str(listing)  # a listing file stands for its folder
    assert image_paths(t)[0] == str(tmp_path / "a/x.png")
    bare = EmbeddingTable(["a/x.png"], ["a"], ["k1"], None, {})
    assert image_paths(bare, bare) == ["a/x.png"]
