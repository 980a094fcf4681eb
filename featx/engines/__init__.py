"""Execution engines for ``featx extract``: the same job on this machine or on a Ray cluster.

``result`` holds what they share (``ExtractJob`` in, ``EngineRun`` out, ``finish``
writing the table and report), ``local`` the threaded reader/encoder/writer
pipeline, ``ray`` the Ray Data engine (featx[ray]).
"""

from __future__ import annotations

from featx._lazy import lazy_exports

_EXPORTS = {
    "ExtractJob": "featx.engines.result",
    "EngineRun": "featx.engines.result",
    "ExtractResult": "featx.engines.result",
    "EmbedStats": "featx.engines.result",
    "LocalEngine": "featx.engines.local",
    "RayEngine": "featx.engines.ray",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
