"""``featx audit``: label issues (cleanlab), near duplicates and leakage, outliers, a relabel page.

``job`` runs it (``audit``), ``labels`` (confident learning on out-of-fold probabilities),
``outliers`` (kNN distance against the table's own), ``page`` (``audit.html``).
"""

from __future__ import annotations

from featx._lazy import lazy_exports

_EXPORTS = {"audit": "featx.audit.job", "AuditResult": "featx.audit.job"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
