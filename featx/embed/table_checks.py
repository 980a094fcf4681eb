"""Checks a table must pass before its embeddings are searched or compared with another's.

One home for the refusals that neighbors, duplicates and audit share, so each says the
same thing: a row whose embedding is not finite (NaN or infinite: the table was damaged
or edited after extraction; the store never serves such rows), and a table whose featx
metadata was stripped, so the backbone that made it cannot be checked.
"""

from __future__ import annotations

import numpy as np

from featx.embed.scan import display_path
from featx.embed.table import EmbeddingTable
from featx.errors import FeatXError, MismatchError

__all__ = ["require_fingerprint", "require_finite", "require_same_backbone"]


def require_finite(t: EmbeddingTable, name: str) -> None:
    """Refuse a table with rows whose embeddings hold NaN or infinite values.

    A similarity with such a row is NaN: a query would get invented neighbours, and a
    searched row would silently never be found.
    """
    if t.X is None or t.X.size == 0:
        return
    bad = np.flatnonzero(~np.isfinite(t.X).all(axis=1))
    if len(bad):
        first = display_path(t.paths[int(bad[0])]) if t.paths else f"row {int(bad[0])}"
        raise FeatXError(f"{name}: {len(bad)} of {len(t)} rows have NaN or infinite embeddings "
                         f"(first: {first}); the table was damaged or edited after extraction. "
                         "Extract the images again (embeddings already in the store are reused)")


def require_fingerprint(t: EmbeddingTable, name: str) -> None:
    """Refuse a table with no backbone fingerprint: its featx metadata was stripped."""
    if not t.fingerprint:
        raise MismatchError(f"{name} carries no featx metadata (no backbone fingerprint: it was "
                            "stripped, or the table was not written by featx), so the backbone that "
                            "made its embeddings cannot be checked; extract the images again with "
                            "`featx extract`")


def require_same_backbone(a: EmbeddingTable, a_name: str, b: EmbeddingTable, b_name: str) -> None:
    """Refuse to compare embeddings of two backbones (fingerprints differ, or one is unknown)."""
    require_fingerprint(a, a_name)
    require_fingerprint(b, b_name)
    fa, fb = a.fingerprint, b.fingerprint
    if fa != fb:
        raise MismatchError(
            f"{b_name} was embedded with backbone {b.meta.get('backbone', '?')!r} (fingerprint {fb}), "
            f"{a_name} with {a.meta.get('backbone', '?')!r} (fingerprint {fa}): embeddings of different "
            f"backbones are not comparable. Extract both with the same backbone (`featx extract ... "
            f"--backbone {a.meta.get('backbone_path') or a.meta.get('backbone', 'NAME')}`).")
    if a.X is not None and b.X is not None and a.X.shape[1] != b.X.shape[1]:
        raise MismatchError(f"{b_name} has {b.X.shape[1]}-wide embeddings, {a_name} {a.X.shape[1]}-wide")
