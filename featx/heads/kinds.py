"""The head kinds featx fits: the one list, and the one check of a requested kind.

``fit_head`` / ``make_head`` and ``FeatXClassifier`` fit the in-memory kinds;
``fit_table`` (``featx fit-head``) takes every kind, the streaming ones over a table
larger than memory (``featx.heads.streaming``).
"""

from __future__ import annotations

from featx.errors import FeatXError

#: scaler + classifier fitted in memory (featx.heads.fit), C chosen by cross-validation
IN_MEMORY_HEADS = ("logreg", "linear-svm", "svm-rbf")
#: fitted shard by shard over an embeddings table (featx.heads.streaming)
STREAMING_HEADS = ("sgd-logreg",)
#: every kind ``featx fit-head --head`` accepts
HEAD_KINDS = IN_MEMORY_HEADS + STREAMING_HEADS


def check_head_kind(kind: str, allowed: tuple[str, ...] = HEAD_KINDS) -> str:
    """``kind`` if it is one of ``allowed``; else a FeatXError naming the choices."""
    if kind in allowed:
        return kind
    why = ""
    if kind in STREAMING_HEADS:
        why = f" ({kind} streams an embeddings table: featx.fit_table.fit_table or `featx fit-head --head {kind}`)"
    raise FeatXError(f"unknown head {kind!r}; expected one of {', '.join(allowed)}{why}")
