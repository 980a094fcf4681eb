"""Images listed by URL (``s3://``, ``gs://``, ``https://``, ``file://``, ``memory://``...), read through fsspec.

A listing (``featx.embed.scan.scan_table``) may name an image by a URL instead of a
local path. fsspec is an optional dependency (the ``remote`` extra), imported only
when a URL is met; the filesystem of each protocol comes from its own package
(``s3fs`` for ``s3://``, ``gcsfs`` for ``gs://``, ``aiohttp`` for ``http(s)://``),
which the user installs for the protocols they use.

A URL has no stat that featx could trust (``featx.embed.statcache``), so its bytes
are read and hashed on every run; only the embedding is cached.
"""

from __future__ import annotations

import re

from featx.errors import ImageError, MissingDependencyError, require

__all__ = ["check_protocol", "is_url", "protocol_of", "read_url"]

# a scheme of two or more characters, so a Windows drive ("C://x") is not taken for one
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+)://")


def is_url(path: str) -> bool:
    """True if ``path`` starts with a URL scheme (``s3://``, ``file://``...), not a local path."""
    return _URL.match(path) is not None


def protocol_of(url: str) -> str:
    """The scheme of ``url`` (``"s3"`` for ``s3://bucket/key``)."""
    m = _URL.match(url)
    if m is None:
        raise ValueError(f"not a URL: {url!r}")
    return m.group(1)


def _fsspec():
    return require("fsspec", "remote")


def check_protocol(url: str) -> str | None:
    """Why fsspec cannot read ``url``'s protocol (it does not know it), or None when it can.

    Cheap (no network): it only asks fsspec for the protocol's filesystem class.

    Raises
    ------
    MissingDependencyError
        When fsspec is not installed, or the package of a protocol it knows is not
        (s3fs for ``s3://``, gcsfs for ``gs://``...): an installation to fix, not a bad row.
    """
    fsspec = _fsspec()
    proto = protocol_of(url)
    try:
        fsspec.get_filesystem_class(proto)
    except ImportError as e:  # fsspec's message names the package
        raise MissingDependencyError(
            f"reading {proto}:// URLs needs a package that is not installed ({e}); install it "
            "where featx runs (s3fs for s3://, gcsfs for gs://, aiohttp for http(s)://)") from None
    except ValueError:
        return f"unknown URL protocol '{proto}' (fsspec has no filesystem for {proto}://)"
    return None


def read_url(url: str, max_bytes: int) -> bytes:
    """The bytes of the object at ``url``; an ImageError naming the URL and the reason otherwise.

    The size is asked first where the filesystem knows it, so an object over
    ``max_bytes`` is refused before it is downloaded.
    """
    try:
        why = check_protocol(url)
    except MissingDependencyError as e:
        raise ImageError(url, str(e)) from None
    if why:
        raise ImageError(url, why)
    fsspec = _fsspec()
    try:
        fs, path = fsspec.core.url_to_fs(url)
        size = _size(fs, path)
        if size == 0:
            raise ImageError(url, "empty file (0 bytes)")
        if size is not None and size > max_bytes:
            raise ImageError(url, f"file too large ({size} bytes > {max_bytes})")
        with fs.open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(url, "no such file or object") from None
    except IsADirectoryError:
        raise ImageError(url, "is a directory") from None
    except PermissionError:
        raise ImageError(url, "permission denied") from None
    except Exception as e:  # network and cloud client errors have no common type: one bad URL, one failed row
        raise ImageError(url, f"cannot read: {type(e).__name__}: {e}") from None
    if not data:
        raise ImageError(url, "empty file (0 bytes)")
    if len(data) > max_bytes:
        raise ImageError(url, f"file too large (more than {max_bytes} bytes)")
    return data


def _size(fs, path: str) -> int | None:
    """The object's size from its metadata, or None when the filesystem does not say."""
    info = fs.info(path)  # FileNotFoundError for a missing object: reported by the caller
    if info.get("type") == "directory":
        raise IsADirectoryError(path)
    size = info.get("size")
    return int(size) if size is not None else None
