"""The out-of-core SGD head on real features (sklearn's digits), stored as featx tables."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from featx.embed.table import EmbeddingTable, write_table
from featx.errors import FeatXError, MismatchError
from featx.heads.streaming import fit_streaming_head

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digits_split():
    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X.astype(np.float32), y, test_size=0.3, random_state=0,
                                          stratify=y)
    order = np.argsort(ytr, kind="stable")  # like a featx table: folder order, sorted by class
    return Xtr[order], ytr[order], Xte, yte


def write(path, X, y, fingerprint="fp-digits", labels=True):
    n = len(X)
    return write_table(path, EmbeddingTable(
        paths=[f"{NAMES[c]}/{i}.png" for i, c in enumerate(y)],
        labels=[NAMES[c] for c in y] if labels else [None] * n,
        keys=[f"k{i}" for i in range(n)], X=X,
        meta={"fingerprint": fingerprint, "backbone": "digits-pixels", "dim": X.shape[1]}))


def test_streaming_head_matches_in_memory_logreg(tmp_path):
    Xtr, ytr, Xte, yte = digits_split()
    # a directory of tables, each sorted by class, read 200 rows at a time
    half = len(Xtr) // 2
    write(tmp_path / "t" / "part-0.parquet", Xtr[:half], ytr[:half])
    write(tmp_path / "t" / "part-1.parquet", Xtr[half:], ytr[half:])
    pipe, rep = fit_streaming_head(tmp_path / "t", epochs=15, shard_rows=200)
    assert rep.classes == sorted(NAMES) and rep.rows == len(Xtr) and rep.fingerprint == "fp-digits"
    assert rep.train_rows + rep.val_rows == rep.rows and rep.val_rows > 0
    assert rep.buckets == -(-len(Xtr) // 200)
    assert rep.max_rows_in_memory <= 260  # one shard (+ binomial spread of a random bucket)
    codes = {c: i for i, c in enumerate(rep.classes)}
    y_te = np.array([codes[NAMES[c]] for c in yte])
    y_tr = np.array([codes[NAMES[c]] for c in ytr])
    acc_stream = (pipe.predict(Xte) == y_te).mean()
    ref = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(Xtr, y_tr)
    acc_ref = (ref.predict(Xte) == y_te).mean()
    assert acc_ref > 0.95
    assert acc_stream >= acc_ref - 0.02, (acc_stream, acc_ref)
    assert set(rep.curve) == {"0.0001", "0.001", "0.01"} and all(len(v) == 15 for v in rep.curve.values())


def test_streaming_head_refuses_mixed_backbones_and_unlabelled(tmp_path):
    Xtr, ytr, _, _ = digits_split()
    write(tmp_path / "mix" / "a.parquet", Xtr[:100], ytr[:100], fingerprint="aaaa")
    write(tmp_path / "mix" / "b.parquet", Xtr[100:200], ytr[100:200], fingerprint="bbbb")
    with pytest.raises(MismatchError, match="backbone bbbb"):
        fit_streaming_head(tmp_path / "mix")
    write(tmp_path / "unlab.parquet", Xtr[:100], ytr[:100], labels=False)
    with pytest.raises(FeatXError, match="no label"):
        fit_streaming_head(tmp_path / "unlab.parquet")
    with pytest.raises(FeatXError, match="no such embeddings table"):
        fit_streaming_head(tmp_path / "missing.parquet")
    with pytest.raises(FeatXError, match="epochs must be"):
        fit_streaming_head(tmp_path / "unlab.parquet", epochs=0)


def test_cli_fit_head_sgd_logreg(image_folder, lite0, tmp_path):
    """fit-head --head sgd-logreg streams the table and writes a head that predict can use."""
    from click.testing import CliRunner

    from featx.cli import main
    from featx.extract import extract
    from featx.heads.headfile import load_head

    from .helpers import make_image_folder

    make_image_folder(image_folder, per_class=10)
    extract(image_folder, lite0, out=tmp_path / "t.parquet", store=tmp_path / "s", device="cpu")
    r = CliRunner().invoke(main, ["fit-head", "--embeddings", str(tmp_path / "t.parquet"), "--head",
                                  "sgd-logreg", "--out", str(tmp_path / "h.joblib"), "--json"])
    assert r.exit_code == 0, r.output
    h = load_head(tmp_path / "h.joblib")
    assert h.classes == ["cat", "thing"] and h.fingerprint == lite0.fingerprint
    r = CliRunner().invoke(main, ["predict", str(tmp_path / "h.joblib"), str(image_folder), "--json",
                                  "--store", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output


def test_streaming_head_memory_and_files_do_not_grow_with_the_table(tmp_path, monkeypatch):
    """Bucket files are capped, each chunk in memory is at most shard_rows rows, and the
    held-out split is scored chunk by chunk (it used to be read whole: 10% of the table)."""
    import featx.heads.streaming as streaming

    Xtr, ytr, Xte, yte = digits_split()
    write(tmp_path / "t.parquet", Xtr, ytr)
    monkeypatch.setattr(streaming, "MAX_BUCKETS", 3)
    pipe, rep = fit_streaming_head(tmp_path / "t.parquet", epochs=8, shard_rows=50)
    assert rep.buckets == 3  # not ceil(1257 / 50) = 26 open writers
    assert rep.max_rows_in_memory <= 50
    codes = {c: i for i, c in enumerate(rep.classes)}
    acc = (pipe.predict(Xte) == np.array([codes[NAMES[c]] for c in yte])).mean()
    assert acc > 0.9, acc


def test_the_shuffle_pass_holds_a_row_group_not_the_table(tmp_path):
    """pyarrow's dataset scanner kept every row group it had read alive until the file ended:
    the shuffle pass of a 1M x 1,280 table peaked at 11.7 GB. One group is decoded at a time."""
    import pyarrow as pa

    rng = np.random.default_rng(0)
    groups, rows, dim = 40, 128, 1280  # 26 MB of embeddings in 40 row groups
    y = np.repeat(np.arange(2), groups * rows // 2)
    n = len(y)
    t = EmbeddingTable(paths=[f"{NAMES[c]}/{i}.png" for i, c in enumerate(y)], labels=[NAMES[c] for c in y],
                       keys=[f"k{i}" for i in range(n)], X=None,
                       meta={"fingerprint": "fp-wide", "backbone": "wide", "dim": dim})
    chunks = (rng.normal(size=(rows, dim)).astype(np.float32) + y[g * rows:(g + 1) * rows, None]
              for g in range(groups))
    write_table(tmp_path / "wide.parquet", t, chunks=chunks)
    peak = [0]

    def watch(stage, done, total):
        if stage == "shuffle":
            peak[0] = max(peak[0], pa.total_allocated_bytes())

    fit_streaming_head(tmp_path / "wide.parquet", epochs=1, shard_rows=rows, progress=watch)
    table_bytes = n * dim * 4
    assert 0 < peak[0] < table_bytes / 3, (peak[0], table_bytes)
