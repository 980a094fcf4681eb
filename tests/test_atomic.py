"""featx.atomic: concurrent writers of one path leave one complete file, never a mix."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest

from featx.atomic import atomic_path, clean_stale_temporaries, write_bytes


def _writer(path: str, byte: int, n: int) -> None:
    for _ in range(n):
        write_bytes(path, bytes([byte]) * 3_000_000)


def test_two_processes_writing_one_path_never_mix(tmp_path):
    target = tmp_path / "out.bin"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(target), b, 15)) for b in (1, 2)]
    for p in procs:
        p.start()
    seen = set()
    while any(p.is_alive() for p in procs):
        if target.exists():
            data = target.read_bytes()
            assert len(data) == 3_000_000 and len(set(data)) == 1, "a reader saw a mixed or short file"
            seen.add(data[0])
    for p in procs:
        p.join()
        assert p.exitcode == 0
    data = target.read_bytes()
    assert len(data) == 3_000_000 and len(set(data)) == 1
    assert not list(tmp_path.glob(".*featx-tmp")), "no temporaries left behind"


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_final_file_gets_normal_permissions(tmp_path):
    p = write_bytes(tmp_path / "x", b"1")
    mask = os.umask(0o022)
    os.umask(mask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~mask


def test_stale_temporaries_are_cleaned(tmp_path):
    old = tmp_path / ".t.parquet.abc.featx-tmp"
    new = tmp_path / ".u.parquet.def.featx-tmp"
    old.write_bytes(b"x")
    new.write_bytes(b"y")
    past = time.time() - 3 * 86400
    os.utime(old, (past, past))
    assert clean_stale_temporaries(tmp_path) == 1
    assert not old.exists() and new.exists()


def test_figure_writes_the_png_atomically_and_closes_it(tmp_path):
    import matplotlib.pyplot as plt

    from featx.atomic import TMP_SUFFIX, figure

    before = set(plt.get_fignums())
    with figure(tmp_path / "a.png", ncols=2, figsize=(4, 2)) as (fig, (a1, a2)):
        a1.plot([0, 1], [1, 0])
        a2.set_title(fig.get_label() or "right")
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(plt.get_fignums()) == before and not list(tmp_path.glob(f"*{TMP_SUFFIX}"))


def test_a_figure_that_fails_while_drawing_writes_nothing_and_is_closed(tmp_path):
    import matplotlib.pyplot as plt

    from featx.atomic import figure

    before = set(plt.get_fignums())
    with pytest.raises(ZeroDivisionError), figure(tmp_path / "b.png") as (_, ax):
        ax.plot([0, 1 / 0])
    assert set(plt.get_fignums()) == before and list(tmp_path.iterdir()) == []


def test_compare_features_plot_is_written_through_the_one_helper(tmp_path):
    """features.png used to be saved in place (not atomic) and left open on an error."""
    import matplotlib.pyplot as plt

    from featx.compare_features import plot_features

    before = set(plt.get_fignums())
    bad = [{"extract_ms_per_image": 1.0, "cv_accuracy": 0.9, "cv_std": 0.01, "test_accuracy": None,
            "backbone": "b", "features": "last"}]  # no "crop": fails while drawing
    with pytest.raises(KeyError):
        plot_features(tmp_path, bad, bad[0])
    assert set(plt.get_fignums()) == before and list(tmp_path.iterdir()) == []
    ok = [{**bad[0], "crop": "center"}]
    assert plot_features(tmp_path, ok, ok[0]).read_bytes()[:4] == b"\x89PNG"


def test_finetune_curve_is_written_through_the_one_helper(tmp_path):
    """curve.png was left open when drawing failed (no close on an error)."""
    import matplotlib.pyplot as plt

    from featx.finetune.runlog import plot_curve

    before = set(plt.get_fignums())
    row = {"epoch": 1, "train_loss": 1.0, "val_loss": 1.1, "train_acc": 0.5, "val_acc": 0.4}
    assert plot_curve(tmp_path, [row], 1).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(KeyError):
        plot_curve(tmp_path / "x", [{"epoch": 1, "train_loss": 1.0}], 1)  # no val_loss
    assert set(plt.get_fignums()) == before


def test_the_store_sweeps_its_old_temporary_names_through_the_one_helper(tmp_path):
    from featx.embed.store import LEGACY_TEMPORARIES, clean_temporaries

    assert clean_stale_temporaries(tmp_path, patterns=LEGACY_TEMPORARIES) == 0
    names = [".a.parquet.x.featx-tmp", ".tmp-shard-3.parquet", "meta.1.tmp", "keep.parquet"]
    past = time.time() - 3 * 86400
    for n in names:
        (tmp_path / n).write_bytes(b"x")
        os.utime(tmp_path / n, (past, past))
    assert clean_temporaries(tmp_path) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["keep.parquet"]
