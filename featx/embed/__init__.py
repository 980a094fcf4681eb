"""Embedding: images -> pixels -> ONNX Runtime -> the content-addressed store -> tables.

``scan`` (find the images of a folder or listing, their labels; ``resolve_item_path``),
``images`` (content keys, decode, resize, crop: the one preprocessing; thumbnails),
``remote`` (URLs read through fsspec, lazily), ``runtime`` (``Encoder``: an ONNX
Runtime session), ``store`` (``EmbeddingStore``: shards keyed by content hash under
the backbone fingerprint), ``statcache`` (skip re-hashing unchanged files), ``table``
(the Parquet table users read), ``arrow`` (the Arrow columns those write).
"""

from __future__ import annotations

from featx._lazy import lazy_exports

_EXPORTS = {
    "ScanResult": "featx.embed.scan",
    "scan_folder": "featx.embed.scan",
    "scan_table": "featx.embed.scan",
    "load_image": "featx.embed.images",
    "decode": "featx.embed.images",
    "resize_crop": "featx.embed.images",
    "content_key": "featx.embed.images",
    "IMAGE_EXTENSIONS": "featx.embed.images",
    "Encoder": "featx.embed.runtime",
    "EmbeddingStore": "featx.embed.store",
    "EmbeddingTable": "featx.embed.table",
    "read_table": "featx.embed.table",
    "write_table": "featx.embed.table",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
