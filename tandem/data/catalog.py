"""The item catalog: external ids <-> contiguous internal indices, plus the item text fields.

Internal index 0 is reserved for padding, so item ``i`` of the frame has index ``i + 1``. Every
model, index and embedding matrix in Tandem is laid out on these indices.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

PADDING_INDEX = 0
CATALOG_COLUMNS = ("item_id", "title", "year", "genres", "text", "image_path")


class UnknownItemsError(KeyError):
    """Raised when external item ids are not in the catalog; ``unknown`` lists them."""

    def __init__(self, unknown: Sequence[str]):
        self.unknown = list(unknown)
        shown = ", ".join(repr(i) for i in self.unknown[:10])
        more = f" (+{len(self.unknown) - 10} more)" if len(self.unknown) > 10 else ""
        super().__init__(f"{len(self.unknown)} unknown item id(s): {shown}{more}")

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Catalog:
    """Items as a columnar frame with columns ``CATALOG_COLUMNS``.

    ``item_id`` is a string; ``year`` a nullable Int64; ``genres`` a tuple of names; ``text`` and
    ``image_path`` strings or None.
    """

    frame: pd.DataFrame
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        missing = [c for c in CATALOG_COLUMNS if c not in self.frame.columns]
        if missing:
            raise ValueError(f"catalog frame lacks columns {missing}")
        ids = self.frame["item_id"].tolist()
        index = {item_id: i + 1 for i, item_id in enumerate(ids)}
        if len(index) != len(ids):
            dup = self.frame["item_id"][self.frame["item_id"].duplicated()].tolist()[:5]
            raise ValueError(f"duplicate item ids in catalog: {dup}")
        object.__setattr__(self, "_index", index)

    @classmethod
    def from_records(
        cls,
        item_ids: Sequence[str],
        titles: Sequence[str],
        years: Sequence[int | None] | None = None,
        genres: Sequence[Sequence[str]] | None = None,
        texts: Sequence[str | None] | None = None,
        image_paths: Sequence[str | None] | None = None,
    ) -> Catalog:
        n = len(item_ids)
        frame = pd.DataFrame(
            {
                "item_id": [str(i) for i in item_ids],
                "title": list(titles),
                "year": pd.array(list(years) if years is not None else [None] * n, dtype="Int64"),
                "genres": [tuple(g) for g in genres] if genres is not None else [()] * n,
                "text": list(texts) if texts is not None else [None] * n,
                "image_path": list(image_paths) if image_paths is not None else [None] * n,
            }
        )
        return cls(frame)

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def num_items(self) -> int:
        """Number of real items; embedding tables need ``num_items + 1`` rows (padding)."""
        return len(self.frame)

    @property
    def item_ids(self) -> list[str]:
        return self.frame["item_id"].tolist()

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._index

    def index_of(self, item_ids: Iterable[str]) -> np.ndarray:
        """Internal indices of ``item_ids``; raises UnknownItemsError listing every unknown id."""
        ids = list(item_ids)
        unknown = [i for i in ids if i not in self._index]
        if unknown:
            raise UnknownItemsError(unknown)
        return np.fromiter((self._index[i] for i in ids), dtype=np.int64, count=len(ids))

    def known(self, item_ids: Iterable[str]) -> tuple[list[str], list[str]]:
        """Split ids into (known, unknown), keeping their order."""
        known, unknown = [], []
        for item_id in item_ids:
            (known if item_id in self._index else unknown).append(item_id)
        return known, unknown

    def id_of(self, indices: Iterable[int]) -> list[str]:
        """External ids of internal indices (1-based; 0 is padding and is rejected)."""
        ids = self.frame["item_id"].to_numpy()
        out = []
        for idx in indices:
            if idx <= PADDING_INDEX or idx > len(ids):
                raise IndexError(f"internal item index {idx} out of range 1..{len(ids)}")
            out.append(ids[idx - 1])
        return out

    def title_of(self, index: int) -> str:
        return str(self.frame["title"].iat[index - 1])

    def row(self, index: int) -> dict:
        """All fields of the item with internal ``index`` as a plain dict."""
        record = self.frame.iloc[index - 1].to_dict()
        record["year"] = None if pd.isna(record["year"]) else int(record["year"])
        record["genres"] = tuple(record["genres"])
        return record
