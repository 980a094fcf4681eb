"""Execution engines: embedding images through the store, on this machine or on a Ray cluster.

``files`` is the front door every job uses (``FileEmbedder``: files and arrays
through the store; ``LocalEngine`` for ``featx extract``), ``local`` the threaded
reader/encoder/writer stages, ``result`` what the engines share (``ExtractJob`` in,
``EngineRun`` out, ``finish`` writing the table and report), ``ray`` the Ray engine
(tasks and actors; featx[ray]).
"""

from __future__ import annotations

from featx._lazy import lazy_exports

_EXPORTS = {
    "ExtractJob": "featx.engines.result",
    "EngineRun": "featx.engines.result",
    "ExtractResult": "featx.engines.result",
    "EmbedStats": "featx.engines.result",
    "LocalEngine": "featx.engines.files",
    "FileEmbedder": "featx.engines.files",
    "RayEngine": "featx.engines.ray",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
