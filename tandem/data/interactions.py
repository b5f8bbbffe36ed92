"""User-item interactions in time order, with contiguous user and item indices."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from tandem.data.catalog import Catalog

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp", "rating")


@dataclass(frozen=True)
class Interactions:
    """A frame of (user_id, item_id, timestamp, rating) sorted by user, then time.

    Sorting is stable: events with equal timestamps keep the order of the source file, which
    matters for MovieLens-100K where many ratings share a second. ``user_index`` numbers users
    0..U-1 in order of their first appearance in the sorted frame; ``item_index`` is the catalog's
    1-based index.
    """

    frame: pd.DataFrame
    user_ids: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, raw: pd.DataFrame, catalog: Catalog) -> Interactions:
        """Order ``raw`` (columns user_id, item_id, timestamp[, rating]) and index it."""
        frame = raw.copy()
        frame["user_id"] = frame["user_id"].astype(str)
        frame["item_id"] = frame["item_id"].astype(str)
        frame["timestamp"] = frame["timestamp"].astype("int64")
        if "rating" not in frame.columns:
            frame["rating"] = np.nan
        frame["rating"] = frame["rating"].astype("float32")
        frame["_order"] = np.arange(len(frame))
        user_ids = sorted(frame["user_id"].unique(), key=_natural_key)
        user_pos = {u: i for i, u in enumerate(user_ids)}
        frame["user_index"] = frame["user_id"].map(user_pos).astype("int64")
        frame["item_index"] = catalog.index_of(frame["item_id"].tolist())
        frame = frame.sort_values(["user_index", "timestamp", "_order"], kind="stable")
        frame = frame.drop(columns="_order").reset_index(drop=True)
        return cls(frame=frame, user_ids=user_ids)

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    def sequences(self) -> list[np.ndarray]:
        """Per user (by user index), the item indices oldest-first."""
        return self._per_user("item_index")

    def timestamps(self) -> list[np.ndarray]:
        """Per user (by user index), the interaction times oldest-first, aligned with
        ``sequences()``."""
        return self._per_user("timestamp")

    def _per_user(self, column: str) -> list[np.ndarray]:
        values = self.frame[column].to_numpy()
        bounds = np.flatnonzero(np.diff(self.frame["user_index"].to_numpy())) + 1
        return [np.asarray(s, dtype=np.int64) for s in np.split(values, bounds)]

    def item_counts(self, num_items: int) -> np.ndarray:
        """Interaction count per item index (length ``num_items + 1``, padding row 0)."""
        return np.bincount(self.frame["item_index"].to_numpy(), minlength=num_items + 1)


def _natural_key(user_id: str) -> tuple[int, int | str]:
    """Numeric ids sort numerically ("2" < "10"), the rest lexically after them."""
    return (0, int(user_id)) if user_id.isdigit() else (1, user_id)
