"""`featx cache info` keeps its columns in line with long backbone names (issue 27, item 14)."""

from __future__ import annotations

import dataclasses

import numpy as np
from click.testing import CliRunner

from featx.cli import main
from featx.embed.store import EmbeddingStore, ShardWriter


def test_columns_line_up_with_a_long_backbone_name(lite0, tmp_path):
    store = tmp_path / "store"
    names = {"0123456789abcdef": "short", "fedcba9876543210": "timm:convnext_small.fb_in22k_ft_in1k_384"}
    for fp, name in names.items():
        side = dataclasses.replace(lite0.sidecar, name=name, fingerprint=fp, dim=8)
        with ShardWriter(EmbeddingStore(dataclasses.replace(lite0, sidecar=side), store)) as w:
            w.add([f"{fp}{i}" for i in range(3)], np.ones((3, 8), np.float32))
    r = CliRunner().invoke(main, ["cache", "info", "--store", str(store)])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    header = next(line for line in lines if line.startswith("fingerprint"))
    rows = [line for line in lines if line[:16] in names]
    assert len(rows) == 2
    col = header.index("  dim") + len("  dim")  # right edge of the dim column
    assert all(row[col - 1] == "8" and row[col] == " " for row in rows), (header, rows)
