"""``relabel.csv``: label corrections and drops for ``featx fit-head --relabel`` (made by ``featx audit``).

The file has a header and one row per image: ``path,action,label``.

* ``path``: the image as the table lists it (relative to the table's data root, the
  ``path`` column of ``featx extract``'s table, what ``featx audit`` writes), or its
  full path under that root;
* ``action``: ``relabel`` (``label`` is the corrected class, one of the table's
  classes) or ``drop`` (the image is left out of the fit; ``label`` is ignored).

Every row is checked before anything is fitted: a path the table does not have, a
label that is not a class, an unknown action, or one image listed twice with
different wishes is a ``FeatXError`` naming the file, the row and the reason.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from featx.errors import FeatXError

__all__ = ["ACTIONS", "RELABEL_COLUMNS", "Relabel", "apply_relabel", "read_relabel"]

RELABEL_COLUMNS = ("path", "action", "label")
ACTIONS = ("relabel", "drop")
#: changes listed one by one in a head's report (the counts are always complete)
REPORT_CHANGES = 1000


@dataclass
class Relabel:
    """The wishes of a relabel file: ``labels[path]`` = new class; ``drop``: paths left out."""

    file: Path
    labels: dict[str, str] = field(default_factory=dict)
    drop: set[str] = field(default_factory=set)
    rows: dict[str, int] = field(default_factory=dict)  # path -> its row number in the file


def read_relabel(path: str | os.PathLike) -> Relabel:
    """Parse and check the format of a relabel file (not yet against a table)."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise FeatXError(f"{p}: cannot read the relabel file: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise FeatXError(f"{p}: not a UTF-8 text file; expected a CSV with columns "
                         f"{','.join(RELABEL_COLUMNS)}") from None
    reader = csv.reader(io.StringIO(text))
    header = [h.strip().lower() for h in next(reader, [])]
    if header[:3] != list(RELABEL_COLUMNS):
        raise FeatXError(f"{p}: expected the header {','.join(RELABEL_COLUMNS)}, got "
                         f"{','.join(header) or 'an empty file'}")
    rel = Relabel(p)
    for n, row in enumerate(reader, start=2):
        if not row or not any(c.strip() for c in row):
            continue
        row = [*row, "", ""][:3]
        img, action, label = row[0], row[1].strip().lower(), row[2].strip()
        if not img:
            raise FeatXError(f"{p}, row {n}: empty path")
        if action not in ACTIONS:
            raise FeatXError(f"{p}, row {n}: action {row[1]!r} for {img!r}; expected relabel or drop")
        if action == "relabel" and not label:
            raise FeatXError(f"{p}, row {n}: relabel {img!r} to what? the label column is empty")
        wish = ("drop", "") if action == "drop" else ("relabel", label)
        before = ("drop", "") if img in rel.drop else ("relabel", rel.labels[img]) if img in rel.labels else None
        if before is not None and before != wish:
            raise FeatXError(f"{p}, row {n}: {img!r} is listed twice with different wishes "
                             f"(row {rel.rows[img]}: {' '.join(before).strip()}; row {n}: "
                             f"{' '.join(wish).strip()})")
        rel.rows.setdefault(img, n)
        if action == "drop":
            rel.drop.add(img)
        else:
            rel.labels[img] = label
    return rel


def apply_relabel(rel: Relabel, paths: list[str], labels: list, *, root: str | None = None,
                  table: str | os.PathLike = "the table") -> tuple[list[int], list, dict]:
    """(rows kept, their labels after the corrections, a record for the head's report).

    The corrected labels must be classes the table already has; every path must be one of
    the table's (as listed, or its full path under ``root``).
    """
    from featx.embed.scan import resolve_item_path

    where: dict[str, int] = {}
    for i, p in enumerate(paths):
        where.setdefault(p, i)
        if root:
            where.setdefault(resolve_item_path(root, p), i)
    classes = sorted({str(c) for c in labels if c is not None})
    missing = [img for img in [*rel.labels, *sorted(rel.drop)] if img not in where]
    if missing:
        raise FeatXError(f"{rel.file}: {len(missing)} path(s) not in {table}, e.g. {missing[0]!r} "
                         f"(row {rel.rows[missing[0]]}); paths are files as featx audit writes them "
                         "(absolute), or the table's own `path` column")
    bad = [(img, lab) for img, lab in rel.labels.items() if lab not in classes]
    if bad:
        img, lab = bad[0]
        raise FeatXError(f"{rel.file}, row {rel.rows[img]}: {lab!r} is not a class of {table} "
                         f"(classes: {', '.join(classes)})")
    new = list(labels)
    changes = []
    for img, lab in rel.labels.items():
        i = where[img]
        if new[i] != lab:
            changes.append({"path": paths[i], "from": new[i], "to": lab})
        new[i] = lab
    dropped = {where[img] for img in rel.drop}
    keep = [i for i in range(len(paths)) if i not in dropped]
    record = {"file": str(rel.file.resolve()), "relabelled": len(changes), "dropped": len(dropped),
              "changes": changes[:REPORT_CHANGES],
              "dropped_paths": [paths[i] for i in sorted(dropped)][:REPORT_CHANGES]}
    return keep, [new[i] for i in keep], record
