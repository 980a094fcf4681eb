"""Find the images under a folder and their labels (ImageFolder layout)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from featx.embed.images import IMAGE_EXTENSIONS
from featx.errors import FeatXError


@dataclass(frozen=True)
class ImageItem:
    """One image found by ``scan``: path relative to the root, and its label (or None)."""

    path: str
    label: str | None


@dataclass(frozen=True)
class ScanResult:
    root: Path
    items: list[ImageItem]
    classes: list[str]
    skipped: list[tuple[str, str]]  # (relative path, reason) for things that look wrong

    @property
    def labelled(self) -> bool:
        return bool(self.classes)


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def scan(root: str | os.PathLike) -> ScanResult:
    """Find images under ``root``.

    ImageFolder layout (``root/<class>/**/<image>``) gives labels from the
    first-level folder names; images directly under ``root`` make the set
    unlabelled. Mixing both is refused. Hidden files, symlink loops and
    non-image extensions are ignored; paths are sorted for a stable order.
    """
    root = Path(root)
    if not root.exists():
        raise FeatXError(f"{root}: no such file or directory")
    if not root.is_dir():
        raise FeatXError(f"{root}: not a directory (featx reads folders of images)")
    items: list[ImageItem] = []
    skipped: list[tuple[str, str]] = []
    seen_dirs: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=None):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:  # symlink loop
            skipped.append((os.path.relpath(dirpath, root), "symlink loop, not followed"))
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(filenames):
            if _is_hidden(name) or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            rel = name if rel_dir == "." else os.path.join(rel_dir, name)
            label = None if rel_dir == "." else Path(rel_dir).parts[0]
            items.append(ImageItem(rel.replace(os.sep, "/"), label))
    labels = {i.label for i in items}
    if None in labels and len(labels) > 1:
        flat = [i.path for i in items if i.label is None][:3]
        raise FeatXError(
            f"{root}: mixes images at the top level ({', '.join(flat)}, ...) with class folders; "
            "put every image in a class folder (ImageFolder layout) or none (unlabelled)"
        )
    classes = sorted(lbl for lbl in labels if lbl is not None)
    return ScanResult(root=root, items=items, classes=classes, skipped=skipped)
