"""featx.progress renderers: log lines with rate and ETA (the estimators' verbose=), and the
CLI bar's reading of numbered stages ("[2/6] epoch 3/5") (issue 27 item 10)."""

from __future__ import annotations

import logging

from featx.cli.options import Progress
from featx.progress import LogProgress, Watch, eta_text


def test_eta_text():
    assert [eta_text(s) for s in (0.4, 42, 185, 7620)] == ["0 s", "42 s", "3 min 05 s", "2 h 07 min"]


def test_log_progress_rate_and_eta(caplog):
    caplog.set_level(logging.INFO, logger="featx.test")
    p = LogProgress(logging.getLogger("featx.test"), every=3600, prefix="X: ")
    p("embed", 0, 100)
    p("embed", 50, 100)  # within `every` of the last line: not logged
    p("embed", 100, 100)  # the stage's end always is
    p("choose C", 0, 0)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "X: embed 0/100 (0%)"
    assert lines[1].startswith("X: embed 100/100 (100%), ") and lines[1].endswith("/s")
    assert lines[2] == "X: choose C: 0 s" and len(lines) == 3


def test_watch_remembers_each_stage():
    seen = []
    w = Watch(lambda s, d, t: seen.append((s, d, t)))
    w("hash", 3, 3)
    w("embed", 2, 8)
    assert w.last == ("embed", 2, 8) and w.seen == {"hash": (3, 3), "embed": (2, 8)} and len(seen) == 2


def test_the_bar_reads_a_numbered_epoch():
    p = Progress(enabled=True)
    p("[2/6] epoch 3/5", 4, 10)
    assert p.bar.unit == "batch" and p.bar.desc.startswith("[2/6] epoch 3/5")
    p("epoch 4/5", 0, 10)  # the next epoch: its own bar, named by the library
    assert p.bar.n == 0 and p.bar.desc.startswith("epoch 4/5") and p.bar.unit == "batch"
    p("choose C", 1, 15)
    assert p.bar.unit == "fit"
    p("validate", 3, 7)
    assert p.bar.unit == "img"
    p.close()
