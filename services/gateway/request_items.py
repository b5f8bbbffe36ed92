"""The catalog as one request sees it: fallback titles, and which of the ids it was given exist.

An unknown id in a request's history or exclude list is not an error (a client's catalog can
be a little ahead of ours): it is dropped, and the response's ``warnings`` say which ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.gateway.trace import Trace
    from tandem.data import Catalog

MAX_LISTED_IDS = 5  # ids a warning names before "(+N more)"


class RequestItems:
    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        # Fallback titles when the feature store has none: one array lookup, no pandas per request.
        self._titles = catalog.frame["title"].astype(str).to_numpy()

    def titles(self, item_ids: Sequence[str]) -> list[str]:
        """The catalog's titles of known ``item_ids``."""
        return self._titles[self.catalog.index_of(item_ids) - 1].tolist()

    def known_history(self, history: Sequence[str], trace: Trace, *, given: bool) -> list[str]:
        """``history`` without the ids the catalog lacks (``given``: by the request, else
        read from the store), each drop named in ``trace.warnings``."""
        known, unknown = self.catalog.known(history)
        if unknown:
            source = "history" if given else "stored history"
            trace.warnings.append(
                f"dropped {len(unknown)} unknown {source} item(s): {listed(unknown)}"
            )
        return known

    def known_exclude(self, exclude: Sequence[str], trace: Trace) -> list[str]:
        """``exclude`` without the ids the catalog lacks, named in ``trace.warnings``."""
        known, unknown = self.catalog.known(exclude)
        if unknown:
            trace.warnings.append(
                f"ignored {len(unknown)} unknown exclude item(s): {listed(unknown)}"
            )
        return known


def listed(ids: Sequence[str]) -> str:
    """The first ``MAX_LISTED_IDS`` ids, quoted, and how many more."""
    shown = ", ".join(repr(i) for i in ids[:MAX_LISTED_IDS])
    return shown + (f" (+{len(ids) - MAX_LISTED_IDS} more)" if len(ids) > MAX_LISTED_IDS else "")
