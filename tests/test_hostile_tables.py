"""Hostile and unlucky embeddings tables: NaN rows, stripped or damaged featx metadata.

Each table is a real extraction (real photos, the real default backbone) then damaged the
way a user's script or a hostile sender would: one row's embedding set to NaN, the featx
metadata removed, or replaced by something that is not a JSON object.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from featx.embed import arrow
from featx.embed.table import META_KEY
from featx.errors import FeatXError, MismatchError
from featx.extract import extract
from featx.similarity import duplicates, neighbors

from .helpers import make_image_folder, run_cli


@pytest.fixture(scope="module")
def good(tmp_path_factory, lite0) -> Path:
    root = tmp_path_factory.mktemp("tables")
    make_image_folder(root / "data", per_class=3)
    extract(root / "data", lite0, out=root / "good.featx.parquet")
    return root / "good.featx.parquet"


def variant(good: Path, out: Path, *, nan_row: int | None = None, meta: bytes | None = b"keep") -> Path:
    """A copy of ``good`` with one row's embedding NaN and/or its featx metadata replaced."""
    t = pq.read_table(good)
    if nan_row is not None:
        X = np.stack(t.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
        X[nan_row, 3] = np.nan
        t = t.set_column(t.column_names.index("embedding"), "embedding", arrow.embeddings(X))
    md = dict(t.schema.metadata or {})
    if meta is None:
        md.pop(META_KEY, None)
    elif meta != b"keep":
        md[META_KEY] = meta
    else:
        md = dict(pq.read_schema(good).metadata)
    pq.write_table(t.replace_schema_metadata(md or None), out)
    return out


def refused(*args: str, match: str) -> None:
    """The command exits 1 with one clear line (no traceback) matching ``match``."""
    r = run_cli(*args, ok=False)
    assert r.exit_code == 1, r.output
    assert isinstance(r.exception, SystemExit), r.exception
    assert "Traceback" not in r.output
    assert match in r.output, r.output


def test_nan_query_row_gets_no_invented_neighbours(good, tmp_path):
    q = variant(good, tmp_path / "q.featx.parquet", nan_row=2)
    out = tmp_path / "n.csv"
    refused("neighbors", str(q), "--in", str(good), "--out", str(out), match="NaN or infinite")
    assert not out.exists()
    with pytest.raises(FeatXError, match=r"q.featx.parquet: 1 of 6 rows have NaN or infinite"):
        neighbors(q, good, k=2)


def test_nan_rows_in_the_searched_table_are_reported_not_dropped(good, tmp_path, image_folder):
    bad = variant(good, tmp_path / "bad.featx.parquet", nan_row=0)
    refused("duplicates", str(bad), match="1 of 6 rows have NaN or infinite")
    refused("duplicates", str(good), "--across", str(bad), match="NaN or infinite")
    refused("neighbors", str(image_folder), "--in", str(bad), match="NaN or infinite")
    with pytest.raises(FeatXError, match="NaN or infinite"):
        duplicates(bad)


def test_stripped_metadata_is_never_searched_without_a_backbone_check(good, tmp_path, image_folder, lite0):
    bare = variant(good, tmp_path / "bare.featx.parquet", meta=None)
    assert META_KEY not in (pq.read_schema(bare).metadata or {})
    refused("neighbors", str(good), "--in", str(bare), match="carries no featx metadata")
    refused("neighbors", str(bare), "--in", str(good), match="carries no featx metadata")
    refused("duplicates", str(good), "--across", str(bare), match="carries no featx metadata")
    with pytest.raises(MismatchError, match="carries no featx metadata"):
        neighbors(image_folder, bare, k=2, backbone=lite0)
    # within one table no backbone is involved: still searched
    assert len(duplicates(bare, threshold=0.999)) >= 0


@pytest.mark.parametrize("meta", [b"{not json", b"[1, 2]", b'{"fingerprint": 5}', b"\xff\xfe"])
def test_damaged_metadata_is_one_line_everywhere(good, tmp_path, meta):
    bad = variant(good, tmp_path / "bad.featx.parquet", meta=meta)
    why = "the table's featx metadata is damaged"
    refused("fit-head", "--embeddings", str(bad), "--out", str(tmp_path / "h.joblib"), match=why)
    refused("fit-head", "--embeddings", str(bad), "--head", "sgd-logreg", "--out", str(tmp_path / "h.joblib"),
            match=why)
    refused("duplicates", str(bad), match=why)
    refused("neighbors", str(good), "--in", str(bad), match=why)
    refused("plot", str(bad), "--out", str(tmp_path / "plot"), match=why)
    assert not (tmp_path / "h.joblib").exists()


def test_a_folder_of_parts_with_damaged_metadata(good, tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    variant(good, parts / "a.parquet", meta=b"[]")
    shutil.copy(parts / "a.parquet", parts / "b.parquet")
    with pytest.raises(FeatXError, match="metadata is damaged"):
        duplicates(parts)


def test_the_decoder_travels_with_the_table(tmp_path, lite0):
    """extract --decoder simplejpeg: fit-head, neighbors and predict use that decoder with no flag
    (no --backbone value could supply it)."""
    pytest.importorskip("simplejpeg")
    import json

    from featx.heads.headfile import load_head

    data = make_image_folder(tmp_path / "data", per_class=4)
    table = tmp_path / "t.featx.parquet"
    run_cli("extract", str(data), "--decoder", "simplejpeg", "--out", str(table), "-q")
    meta = json.loads(pq.read_schema(table).metadata[META_KEY])
    assert meta["preprocess"]["decoder"] == "simplejpeg" and meta["fingerprint"] != lite0.fingerprint
    run_cli("fit-head", "--embeddings", str(table), "--out", str(tmp_path / "h.joblib"), "--C", "1")
    head = load_head(tmp_path / "h.joblib")
    assert head.preprocess.decoder == "simplejpeg" and head.fingerprint == meta["fingerprint"]
    r = run_cli("neighbors", str(data), "--in", str(table), "-k", "1", "--json")
    assert json.loads(r.output)["queries"] == 8
    r = run_cli("predict", str(tmp_path / "h.joblib"), str(data), "--json")
    assert json.loads(r.output)["images"] == 8
    # the recorded export, named explicitly, is the same backbone with the table's decoder
    run_cli("fit-head", "--embeddings", str(table), "--out", str(tmp_path / "h2.joblib"), "--C", "1",
            "--backbone", meta["backbone_path"])
