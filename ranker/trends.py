"""What was popular just before the decision: per-item interaction counts over recent days.

A sequential retriever sees the order of one user's items, not the calendar, yet on MovieLens
what people watch next depends strongly on what everyone was watching at that time (new
releases, seasonal peaks). That is evidence the ranker can add: for each candidate, how often
it was consumed in the 7 and 30 days before the decision time, and where that puts it within
the candidate list.

The table is built from training interactions only and is strictly causal: a decision at time
``t`` sees days before ``t``'s day. A time past the table's end (serving "now") reads its last
days. Saved as safetensors with the run, so serving computes exactly what training saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

DAY = 86_400
WINDOWS = (7, 30)  # days
TREND_FILE = "trends.safetensors"


@dataclass(frozen=True)
class TrendTable:
    start: int  # epoch seconds of day 0
    cumulative: np.ndarray  # [days + 1, num_items + 1]: row d = counts of days < d

    @classmethod
    def build(cls, times: np.ndarray, items: np.ndarray, num_items: int) -> TrendTable:
        """From parallel arrays of interaction times (epoch seconds) and item indices."""
        times = np.asarray(times, dtype=np.int64)
        start = int(times.min()) // DAY * DAY
        days = (times - start) // DAY
        counts = np.zeros((int(days.max()) + 1, num_items + 1), dtype=np.int32)
        np.add.at(counts, (days, np.asarray(items, dtype=np.int64)), 1)
        cumulative = np.zeros((counts.shape[0] + 1, num_items + 1), dtype=np.int32)
        np.cumsum(counts, axis=0, out=cumulative[1:])
        return cls(start, cumulative)

    @property
    def width(self) -> int:
        return len(WINDOWS) + 1

    def features(self, t: float | None, items: np.ndarray) -> np.ndarray:
        """``[n, 3]``: log1p counts in the 7 and 30 days before ``t``'s day, and the 7-day
        value's z-score within ``items`` (the candidate list). ``None``: the table's end."""
        last = self.cumulative.shape[0] - 1
        day = last if t is None else int(np.clip((int(t) - self.start) // DAY, 0, last))
        items = np.asarray(items, dtype=np.int64)
        cols = []
        for window in WINDOWS:
            begin = max(day - window, 0)
            cols.append(np.log1p(self.cumulative[day, items] - self.cumulative[begin, items]))
        recent = cols[0]
        cols.append((recent - recent.mean()) / (recent.std() + 1e-6))
        return np.stack(cols, axis=1).astype(np.float32)

    def save(self, path: Path) -> None:
        from safetensors.numpy import save_file

        save_file(
            {"cumulative": np.ascontiguousarray(self.cumulative)},
            str(path),
            metadata={"start": str(self.start)},
        )

    @classmethod
    def load(cls, path: Path) -> TrendTable:
        from safetensors import safe_open
        from safetensors.numpy import load_file

        with safe_open(str(path), framework="numpy") as handle:
            start = int(handle.metadata()["start"])
        return cls(start, load_file(str(path))["cumulative"])
