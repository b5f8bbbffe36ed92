"""Small, hand-made datasets for fast tests and benchmarks."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tandem.data import Catalog, Dataset, build_dataset


def synthetic_dataset(
    num_users: int = 40, num_items: int = 60, min_len: int = 6, max_len: int = 20, seed: int = 0
) -> Dataset:
    """Users walk through items with a drift, so sequential models have a pattern to learn."""
    rng = np.random.default_rng(seed)
    catalog = Catalog.from_records(
        item_ids=[f"i{n}" for n in range(num_items)],
        titles=[f"Item {n}" for n in range(num_items)],
        years=[1990 + n % 20 for n in range(num_items)],
        genres=[("Drama",) if n % 2 else ("Comedy",) for n in range(num_items)],
    )
    rows = []
    for user in range(num_users):
        start = int(rng.integers(num_items))
        for step in range(int(rng.integers(min_len, max_len + 1))):
            item = (start + step + int(rng.integers(0, 2))) % num_items
            rows.append((f"u{user}", f"i{item}", 1_000 + step))
    raw = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    return build_dataset("synthetic", catalog, raw)
