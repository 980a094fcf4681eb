"""The embedding store: one ShardWriter, checksummed shards, the stat cache, `featx cache`."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from featx.cli import main
from featx.embed.store import EmbeddingStore
from featx.extract import extract


def test_in_place_edit_keeping_size_and_mtime_is_re_embedded(image_folder, lite0, tmp_path):
    """git-style stat cache: new bytes with the old size and mtime must not match (ctime differs)."""
    import io

    from PIL import Image

    from featx.embed.images import content_key

    store = tmp_path / "s"
    first = extract(image_folder, lite0, store=store, device="cpu", write=False)
    victim = image_folder / "cat" / "cat_0.jpg"
    st = os.stat(victim)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (20, 200, 40)).save(buf, "JPEG")
    assert buf.tell() < st.st_size
    new = buf.getvalue().ljust(st.st_size, b"\0")  # a JPEG reader ignores bytes after the image
    with open(victim, "r+b") as f:  # in place, like dd conv=notrunc: same inode
        f.write(new)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # like touch -r: same mtime
    after = os.stat(victim)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    again = extract(image_folder, lite0, store=store, device="cpu", write=False)
    i = again.table.paths.index("cat/cat_0.jpg")
    assert again.stats.embedded == 1 and again.stats.cached == 7
    assert again.table.keys[i] == content_key(new) != first.table.keys[i]
    fresh = extract(image_folder, lite0, store=tmp_path / "fresh", device="cpu", write=False)
    np.testing.assert_allclose(again.table.X, fresh.table.X, rtol=1e-5, atol=1e-6)
