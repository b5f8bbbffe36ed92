"""Decoded item records by (version, item id), kept in the gateway's process.

Item records are written once, by the bulk publish of a new version, before the alias moves
to it; nothing rewrites an item under an existing version, and version numbers come from an
``INCR`` counter, so they are never reused. A record read under a version therefore stays
true for as long as that version is served, and the items stage of a request whose
candidates were all seen before needs no round trip at all. (The client already relies on
the same fact for its cached schemas.) Bounded: the newest ``max_items`` records are kept.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

from feature_store.schema import ItemRecord


class ItemRecordCache:
    def __init__(self, max_items: int):
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, got {max_items}")
        self.max_items = max_items
        self._records: OrderedDict[tuple[int, str], ItemRecord] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def get_many(
        self, version: int, item_ids: Sequence[str]
    ) -> tuple[dict[str, ItemRecord], list[str]]:
        """(the cached records of ``item_ids``, the ids not cached), in the given order."""
        found: dict[str, ItemRecord] = {}
        missing: list[str] = []
        for item_id in item_ids:
            record = self._records.get((version, item_id))
            if record is None:
                missing.append(item_id)
            else:
                found[item_id] = record
                self._records.move_to_end((version, item_id))
        return found, missing

    def put_many(self, version: int, records: Mapping[str, ItemRecord]) -> None:
        for item_id, record in records.items():
            self._records[(version, item_id)] = record
            self._records.move_to_end((version, item_id))
        while len(self._records) > self.max_items:
            self._records.popitem(last=False)
