"""Where each candidate stood in its life at the decision: how often it had been consumed, and
how long ago it first appeared.

The item rows' popularity (``ranker.signals.side_features``) counts every training interaction,
including those after the decision; the trends (``ranker.trends``) count the last 7 and 30 days.
Neither says whether, when the user chose, an item was an established favourite or had just
arrived. This table says it, strictly causally: for a decision at time ``t``, each candidate's
interactions before ``t`` (log1p), the days since its first one (log1p), and whether it had
none yet. A time past the table's end reads the table's end: serving "now" (``None``, or
today's clock) sees the ages training saw, not ages grown by every day since the table was built.
These are sizes that mean something from one list to the next, so the rows carry them as
measures, outside the context group's scale (``ranker.signals``).

The counts include everyone's interactions before ``t``. The requesting user's own are among
them only as their history, whose items are never candidates (the retriever masks them), so
no list sees its own target. Built from training interactions only; saved as safetensors with
the run, so serving reads exactly what training counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

DAY = 86_400
LIFECYCLE_FILE = "lifecycle.safetensors"


@dataclass(frozen=True)
class LifecycleTable:
    times: np.ndarray  # int64: every training interaction time, grouped by item, sorted in each
    offsets: np.ndarray  # [num_items + 2]: item i's times are times[offsets[i] : offsets[i + 1]]

    @classmethod
    def build(cls, times: np.ndarray, items: np.ndarray, num_items: int) -> LifecycleTable:
        """From parallel arrays of interaction times (epoch seconds) and item indices."""
        times = np.asarray(times, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        if not len(times):
            raise ValueError("a lifecycle table needs at least one training interaction")
        order = np.lexsort((times, items))
        offsets = np.searchsorted(items[order], np.arange(num_items + 2))
        return cls(times[order], offsets.astype(np.int64))

    @cached_property
    def end(self) -> int:
        """Just after the last interaction: what "now" reads (computed once, not per request)."""
        return int(self.times.max()) + 1

    def features(self, t: float | None, items: np.ndarray) -> np.ndarray:
        """``[n, 3]``: log1p(interactions before ``t``), log1p(days since the first), and 1 for
        none yet, for the candidates ``items`` at decision time ``t`` (``None`` or later: the
        table's end). Index 0 and items outside the table read as never seen."""
        items = np.asarray(items, dtype=np.int64)
        known = (items > 0) & (items < len(self.offsets) - 1)
        safe = np.where(known, items, 0)
        start, stop = self.offsets[safe], self.offsets[safe + 1]
        now = self.end if t is None else min(int(t), self.end)
        before = np.array(
            [np.searchsorted(self.times[a:b], now) for a, b in zip(start, stop, strict=True)],
            dtype=np.float64,
        )
        before[~known] = 0.0
        first = np.where(before > 0, self.times[np.minimum(start, len(self.times) - 1)], now)
        days = np.maximum(now - first, 0) / DAY
        columns = [np.log1p(before), np.log1p(days), (before == 0).astype(np.float64)]
        return np.stack(columns, axis=1).astype(np.float32)

    def save(self, path: Path) -> None:
        from safetensors.numpy import save_file

        save_file({"times": self.times, "offsets": self.offsets}, str(path))

    @classmethod
    def load(cls, path: Path) -> LifecycleTable:
        from safetensors.numpy import load_file

        saved = load_file(str(path))
        return cls(saved["times"].astype(np.int64), saved["offsets"].astype(np.int64))
