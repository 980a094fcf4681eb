"""Find the images under a folder and their labels (ImageFolder layout).

What is found, and what is not
------------------------------
- Labels come from the path under the root **as written**: ``root/<class>/**/<image>``.
- A symbolic link is followed only when that cannot change a label: its target lies
  inside the root, in the same class folder as the link. A link into another class
  folder (``ln -s ../dog data/cat/more`` would label dog images ``cat``) or out of the
  root is skipped and reported, unless ``follow_symlinks=True`` (``--follow-symlinks``):
  then every link is followed and labelled by where the link sits. A link back into
  one of its own parent folders is a loop and is never followed.
- Nothing is dropped without a trace: folders that cannot be listed (permission
  denied), paths longer than the system's ``PATH_MAX``, dangling links, links not
  followed and loops are listed in ``ScanResult.skipped`` with their reason.
- A file is an image by its extension (``IMAGE_EXTENSIONS``) or, whatever its
  extension (``.jfif``, none at all), by its first bytes (JPEG, PNG, GIF, WebP, TIFF,
  BMP signatures); those are listed in ``ScanResult.by_content``.
- ``scan_table`` is the other way in: a CSV/TSV/Parquet table with a ``path``
  column (relative to the table's folder, absolute, or a URL that fsspec reads:
  ``featx.embed.remote``) and an optional ``label`` column lists the images, so data
  that is not an ImageFolder needs no copying. ``resolve_item_path`` turns a listed
  path into what is opened: joined to the root, except a URL, which stays as it is.
- Names that are not valid UTF-8 are kept losslessly: ``ImageItem.path`` holds them
  as ``os.fsdecode`` gives them (undecodable bytes as surrogate escapes), so the file
  opens; ``display_path`` is the printable form (``\\xff`` escapes) used in labels,
  reports and CSVs. The table keeps the raw bytes too (see ``featx.embed.table``).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from featx.embed.images import IMAGE_EXTENSIONS
from featx.embed.remote import check_protocol, is_url, protocol_of
from featx.errors import FeatXError, MissingDependencyError

log = logging.getLogger(__name__)

__all__ = ["TABLE_SUFFIXES", "ImageItem", "ScanResult", "display_path", "image_by_content", "is_table_file",
           "is_utf8", "resolve_item_path", "scan", "scan_table", "sniff_image"]

try:
    PATH_MAX = os.pathconf("/", "PC_PATH_MAX")
except (OSError, ValueError, AttributeError):  # not POSIX: the Windows limit without long-path support
    PATH_MAX = 260

FOLLOW_HINT = "not followed (--follow-symlinks follows it)"
TABLE_SUFFIXES = frozenset({".csv", ".tsv", ".parquet", ".pq"})


@dataclass(frozen=True)
class ImageItem:
    """One image found by ``scan``: path relative to the root, and its label (or None)."""

    path: str
    label: str | None


@dataclass(frozen=True)
class ScanResult:
    """The images under ``root`` in a stable order, and what was left out and why."""

    root: Path
    items: list[ImageItem]
    classes: list[str]
    skipped: list[tuple[str, str]]  # (relative path, reason) for things that look wrong
    by_content: list[str] = field(default_factory=list)  # images without an image extension

    @property
    def labelled(self) -> bool:
        return bool(self.classes)


def resolve_item_path(root: str | os.PathLike, path: str) -> str:
    """What to open for an ``ImageItem.path`` found under ``root``: the one place paths are joined.

    A relative path is joined to ``root``, an absolute one stays; so does a URL
    (``s3://bucket/a.jpg``), which pathlib would otherwise collapse to ``s3:/bucket/a.jpg``.
    """
    if is_url(path):
        return path
    if os.sep != "/" or path.startswith(("/", "./")) or path.endswith(("/", "/.")) or path in ("", ".") \
            or "//" in path or "/./" in path:
        return str(Path(root) / path)
    # the same string as pathlib's join, without its parsing per path (44 us: 44 s at 1M files)
    base = _base_of_root(root)
    return path if base == "." else f"{base}{path}" if base == "/" else f"{base}/{path}"


@functools.lru_cache(maxsize=16)
def _base_of_root(root: str | os.PathLike) -> str:
    return str(Path(root))


def display_path(path: str) -> str:
    """``path`` as printable text: bytes that are not UTF-8 become ``\\xNN`` escapes.

    The identity for every valid UTF-8 name; for the others it is for people to
    read (reports, CSVs, labels), while ``path`` itself still opens the file.
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def output_path(path: str) -> str:
    """How every CSV and JSON file featx writes names an image: its absolute path (a URL as
    it is), printable (``display_path``).

    One rule for every output (predict, evaluate, audit, duplicates, neighbors, suggest):
    the file opens from any folder, and the output reads back as a listing (whose relative
    paths would start at the listing's own folder, not at the folder the command ran in).
    """
    return display_path(path if is_url(path) else os.path.abspath(path))


def is_utf8(path: str) -> bool:
    """True if ``path`` has no undecodable bytes (no surrogate escapes from ``os.fsdecode``)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_BMP_HEADER_SIZES = {12, 40, 52, 56, 64, 108, 124}


def sniff_image(head: bytes) -> str | None:
    """The image format whose signature starts ``head`` (16 bytes suffice), or None."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    # "BM" alone is too weak (a text file may start with it): check the DIB header size too
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES:
        return "BMP"
    return None


def image_by_content(path: str | os.PathLike) -> bool:
    """True if the file at ``path`` starts with an image signature (``sniff_image``)."""
    try:
        with open(path, "rb") as f:
            return sniff_image(f.read(32)) is not None
    except OSError:
        return False  # unreadable: nothing says it is an image


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _reason(e: OSError, what: str) -> str:
    if isinstance(e, PermissionError):
        return f"permission denied: cannot {what}, so the images in it are left out"
    if e.errno == errno.ENAMETOOLONG:
        return f"path too long for the system (PATH_MAX {PATH_MAX} bytes)"
    if e.errno == errno.ELOOP:
        return "symlink loop, not followed"
    return f"cannot {what}: {e.strerror or e}"


def _label_of(rel: str, is_dir: bool) -> str | None:
    """The label a path under the root gives: its first folder (a top-level folder is a class)."""
    parts = rel.split("/")
    return parts[0] if is_dir or len(parts) > 1 else None


class _Walk:
    """Depth-first walk in sorted order (files of a folder first, then its subfolders)."""

    def __init__(self, root: Path, follow_symlinks: bool) -> None:
        self.root = root
        self.real_root = os.path.realpath(root)
        self.follow = follow_symlinks
        self.items: list[ImageItem] = []
        self.skipped: list[tuple[str, str]] = []
        self.by_content: list[str] = []

    def run(self) -> None:
        st = os.stat(self.root)
        stack = [(str(self.root), "", frozenset({(st.st_dev, st.st_ino)}))]
        while stack:
            path, rel, chain = stack.pop()
            subdirs = self._folder(path, rel, chain)
            stack.extend(reversed(subdirs))

    def _folder(self, path: str, rel: str, chain: frozenset) -> list[tuple[str, str, frozenset]]:
        """Record the images of one folder; return its subfolders to visit, in order."""
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            if not rel:
                raise FeatXError(f"{self.root}: {_reason(e, 'list the folder')}") from None
            self.skipped.append((rel, _reason(e, "list this folder")))
            return []
        subdirs = []
        for entry in entries:
            if _is_hidden(entry.name):
                continue
            erel = f"{rel}/{entry.name}" if rel else entry.name
            sub = self._entry(entry, erel, chain)
            if sub is not None:
                subdirs.append(sub)
        return subdirs

    def _entry(self, entry: os.DirEntry, rel: str, chain: frozenset) -> tuple[str, str, frozenset] | None:
        n = len(os.fsencode(entry.path))
        if n >= PATH_MAX:
            self.skipped.append((rel, f"path too long ({n} bytes; the system limit is PATH_MAX {PATH_MAX})"))
            return None
        link = entry.is_symlink()
        if not link and entry.is_file(follow_symlinks=False):  # the common case, without a stat call
            self._file(entry.path, rel)
            return None
        try:
            st = entry.stat()  # of the target, for a link
        except FileNotFoundError:
            self.skipped.append((rel, f"dangling symlink: its target {display_path(os.readlink(entry.path))} "
                                      "does not exist" if link else "disappeared during the scan"))
            return None
        except OSError as e:
            self.skipped.append((rel, _reason(e, "read this entry")))
            return None
        is_dir = stat.S_ISDIR(st.st_mode)
        if is_dir and (st.st_dev, st.st_ino) in chain:
            self.skipped.append((rel, "symlink loop (points to one of its own parent folders), not followed"))
            return None
        if link and not self.follow:
            why = self._refuse_link(entry.path, rel, is_dir)
            if why:
                self.skipped.append((rel, why))
                return None
        if is_dir:
            return entry.path, rel, chain | {(st.st_dev, st.st_ino)}
        if stat.S_ISREG(st.st_mode):
            self._file(entry.path, rel)
        elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
            self.skipped.append((rel, "not a regular file (a pipe, socket or device), not read"))
        return None

    def _refuse_link(self, path: str, rel: str, is_dir: bool) -> str | None:
        """Why the link at ``rel`` is not followed, or None when following it keeps labels right."""
        target = os.path.realpath(path)
        try:
            inside = os.path.commonpath([self.real_root, target]) == self.real_root
        except ValueError:  # another drive (Windows)
            inside = False
        if not inside:
            return f"symlink to {display_path(target)}, outside the root; {FOLLOW_HINT}"
        trel = Path(os.path.relpath(target, self.real_root)).as_posix()
        theirs, ours = _label_of(trel, is_dir), _label_of(rel, is_dir)
        if theirs != ours:
            where = f"the class folder '{display_path(theirs)}'" if theirs else "the top of the root"
            return (f"symlink into {where}: following it would label its images "
                    f"{display_path(ours) if ours else 'unlabelled'}; {FOLLOW_HINT}")
        return None

    def _file(self, path: str, rel: str) -> None:
        if os.path.splitext(rel)[1].lower() not in IMAGE_EXTENSIONS:
            if not image_by_content(path):
                return
            self.by_content.append(rel)
        label = _label_of(rel, is_dir=False)
        self.items.append(ImageItem(rel, display_path(label) if label is not None else None))


def scan(root: str | os.PathLike, *, follow_symlinks: bool = False) -> ScanResult:
    """Find images under ``root``.

    ImageFolder layout (``root/<class>/**/<image>``) gives labels from the
    first-level folder names; images directly under ``root`` make the set
    unlabelled. Mixing both is refused. Hidden files are ignored; paths are
    sorted for a stable order. See the module docstring for symlinks, names
    that are not UTF-8 and what is listed in ``skipped``.

    Parameters
    ----------
    root : the folder to scan.
    follow_symlinks : follow every symbolic link (loops excepted), even one into
        another class folder or out of the root; labels still come from where the
        link sits.
    """
    root = Path(root)
    if not root.exists():
        raise FeatXError(f"{root}: no such file or directory")
    if not root.is_dir():
        raise FeatXError(f"{root}: not a directory (featx reads folders of images)")
    walk = _Walk(root, follow_symlinks)
    walk.run()
    items = walk.items
    labels = {i.label for i in items}
    if None in labels and len(labels) > 1:
        flat = [display_path(i.path) for i in items if i.label is None][:3]
        raise FeatXError(
            f"{root}: mixes images at the top level ({', '.join(flat)}, ...) with class folders; "
            "put every image in a class folder (ImageFolder layout) or none (unlabelled)"
        )
    _check_labels_distinct(root, items)
    if walk.skipped:
        log.info("%s: %d paths skipped (%s: %s, ...)", root, len(walk.skipped),
                    display_path(walk.skipped[0][0]), walk.skipped[0][1])
    classes = sorted(lbl for lbl in labels if lbl is not None)
    return ScanResult(root=root, items=items, classes=classes, skipped=walk.skipped, by_content=walk.by_content)


def _check_labels_distinct(root: Path, items: list[ImageItem]) -> None:
    """Refuse two class folders whose printable names collide (b'caf\\xe9' and 'caf\\\\xe9')."""
    folders: dict[str, str] = {}
    for it in items:
        if it.label is None:
            continue
        folder = it.path.split("/", 1)[0]
        other = folders.setdefault(it.label, folder)
        if other != folder:
            raise FeatXError(f"{root}: the class folders {other!a} and {folder!a} print as the same "
                             f"label {it.label!r}; rename one of them")


def is_table_file(path: str | os.PathLike) -> bool:
    """True if ``path`` is a file that ``scan_table`` reads (by its suffix)."""
    p = Path(path)
    return p.suffix.lower() in TABLE_SUFFIXES and p.is_file()


def scan_table(table: str | os.PathLike) -> ScanResult:
    """The images listed in a table: the other way to build a ``ScanResult``.

    A CSV (``.csv``), TSV (``.tsv``) or Parquet (``.parquet``, ``.pq``) file with a
    ``path`` column, relative to the table's folder or absolute, and an optional
    ``label`` column (empty or null: unlabelled). A path may also be a URL that
    fsspec reads (``s3://``, ``gs://``, ``https://``, ``file://``, ``memory://``...):
    it is kept as it is, not joined to the folder, and not looked up here (that is a
    round trip per row); a missing object fails when it is read, with its reason.
    Rows keep the table's order; rows whose local file does not exist, empty paths
    and URLs of a protocol fsspec does not know are listed in ``skipped`` with their
    row number. A featx embeddings table is read with the paths
    relative to the data root it records, so its images can be extracted again
    with another backbone.

    Returns
    -------
    ScanResult
        ``root`` is the folder the relative paths start from; absolute paths and
        URLs are kept as they are in ``items`` (``resolve_item_path`` opens them).

    Raises
    ------
    FeatXError
        When the table lists URLs and fsspec, or the package of a URL's protocol
        (``s3fs``, ``gcsfs``...), is not installed: no row of that protocol could be read.
    """
    table = Path(table)
    paths, labels, base = _read_listing(table)
    items: list[ImageItem] = []
    skipped: list[tuple[str, str]] = []
    protocols: dict[str, str | None] = {}  # protocol -> why it cannot be read; asked once each
    for row, (path, label) in enumerate(zip(paths, labels, strict=True), start=1):
        # a URL is kept as it is and not looked up (a round trip per row): it fails when read
        why = _url_unusable(table, row, path, protocols) if path and is_url(path) else _unusable(base, path)
        if why:
            skipped.append((path or f"{table.name} row {row}", f"row {row}: {why}"))
            continue
        label = None if label is None or str(label) == "" else display_path(str(label))
        items.append(ImageItem(path, label))  # type: ignore[arg-type]
    labels_set = {i.label for i in items}
    if None in labels_set and len(labels_set) > 1:
        first = next(n for n, i in enumerate(items) if i.label is None)
        raise FeatXError(f"{table}: some rows have a label and some do not (first without: "
                         f"{display_path(items[first].path)}); label every row or none")
    classes = sorted(lbl for lbl in labels_set if lbl is not None)
    return ScanResult(root=base, items=items, classes=classes, skipped=skipped)


def _unusable(base: Path, path: str | None) -> str | None:
    """Why a listed path cannot be read as a local image file, or None."""
    if not path:
        return "empty path"
    full = base / path
    if not full.is_file():
        return "no such file" if not full.exists() else "not a file"
    return None


def _url_unusable(table: Path, row: int, url: str, protocols: dict[str, str | None]) -> str | None:
    """Why ``url`` cannot be read (an unknown protocol), or None; each protocol is checked once.

    A missing package (fsspec, s3fs...) stops the scan before any work: every row of
    that protocol would fail, and the fix is an install, not the data.
    """
    proto = protocol_of(url)
    if proto not in protocols:
        try:
            protocols[proto] = check_protocol(url)
        except MissingDependencyError as e:
            raise MissingDependencyError(f"{table}: row {row} is a URL ({url}): {e}") from None
    return protocols[proto]


def _read_listing(table: Path) -> tuple[list[str | None], list, Path]:
    """(paths, labels, base folder) from a CSV/TSV/Parquet listing; FeatXError if it is not one."""
    import pyarrow as pa

    suffix = table.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise FeatXError(f"{table}: not a table featx reads (use {', '.join(sorted(TABLE_SUFFIXES))})")
    try:
        if suffix in (".csv", ".tsv"):
            import pyarrow.csv as pcsv

            t = pcsv.read_csv(table, parse_options=pcsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ","),
                              convert_options=pcsv.ConvertOptions(
                                  column_types={"path": pa.string(), "label": pa.string()}))
        else:
            import pyarrow.parquet as pq

            f = pq.ParquetFile(table)
            t = f.read(columns=[c for c in ("path", "label", "path_bytes") if c in f.schema_arrow.names])
    except (pa.ArrowException, OSError) as e:
        raise FeatXError(f"{table}: cannot read the table: {e}") from None
    if "path" not in t.column_names:
        raise FeatXError(f"{table}: no 'path' column (it has {', '.join(t.column_names) or 'no columns'}); "
                         "list the images in a column named path, labels (optional) in one named label")
    check_listing_types(table, t.schema)
    paths = t.column("path").to_pylist()
    if "path_bytes" in t.column_names:  # a featx table: exact bytes of names that are not UTF-8
        paths = [p if b is None else os.fsdecode(b) for p, b in zip(paths, t.column("path_bytes").to_pylist(),
                                                                     strict=True)]
    labels = t.column("label").to_pylist() if "label" in t.column_names else [None] * len(paths)
    return paths, labels, _base_of(table, t.schema.metadata or {})


def check_listing_types(table: Path, schema) -> None:
    """Refuse listing columns of the wrong type (a Parquet file says its own types): one line,
    not a TypeError from deep inside the scan."""
    import pyarrow.types as pt

    def refuse(col: str, want: str) -> FeatXError:
        return FeatXError(f"{table}: the {col!r} column holds {schema.field(col).type} values, not {want}; "
                          f"write {col} as {want}")

    path_t = schema.field("path").type
    if not (pt.is_string(path_t) or pt.is_large_string(path_t) or pt.is_null(path_t)):
        raise refuse("path", "text (string)")
    if "path_bytes" in schema.names:
        b = schema.field("path_bytes").type
        if not (pt.is_binary(b) or pt.is_large_binary(b) or pt.is_null(b)):
            raise refuse("path_bytes", "bytes (binary)")
    if "label" in schema.names and pt.is_nested(schema.field("label").type):
        raise refuse("label", "text or numbers")


def _base_of(table: Path, metadata: dict) -> Path:
    """The folder relative paths start from: the data root a featx table records, else the table's folder."""
    import json

    raw = metadata.get(b"featx")  # featx.embed.table.META_KEY (table imports this module, not the reverse)
    if raw:
        try:
            root = json.loads(raw).get("root")
        except (ValueError, AttributeError):
            root = None
        if root:
            return Path(root)
    return table.parent


#: ``scan`` under a name that is not its module's (``featx.embed.scan`` is the module)
scan_folder = scan
