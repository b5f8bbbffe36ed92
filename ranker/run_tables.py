"""``RunTables``: the per-candidate evidence a ranker run carries beside its item rows.

Each table turns (user, history, candidates) into a few columns appended to the candidates'
context, and is built from training interactions only: recent popularity (``ranker.trends``),
what other people watched next (``ranker.covisit``), lift in the user's groups
(``ranker.demographics``) and what the whole history predicts (``ranker.ease``). Training,
evaluation and serving append them through this one ``apply``, in this one order, so the rows
a ranker serves are the rows it was trained on; ``save``/``load`` keep each table in its own
safetensors file in the run folder.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from ranker.covisit import COVISIT_FILE, CovisitTable, with_covisit
from ranker.demographics import DEMOGRAPHICS_FILE, DemographicTable, with_demographics
from ranker.ease import EASE_FILE, EaseTable, with_ease
from ranker.prompts import PromptInput
from ranker.trends import TREND_FILE, TrendTable, with_trends

FILES = {
    "trends": (TREND_FILE, TrendTable),
    "covisit": (COVISIT_FILE, CovisitTable),
    "demographics": (DEMOGRAPHICS_FILE, DemographicTable),
    "ease": (EASE_FILE, EaseTable),
}


@dataclass(frozen=True)
class RunTables:
    trends: TrendTable | None = None  # recent popularity per item and day
    covisit: CovisitTable | None = None  # other people's item-to-item co-visitation
    demographics: DemographicTable | None = None  # item popularity by user group
    ease: EaseTable | None = None  # the history's EASE score, the user's own row left out

    @property
    def empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))

    def apply(
        self, inp: PromptInput, index_of: dict[str, int], own: np.ndarray | None = None
    ) -> PromptInput:
        """``inp`` with every present table's columns appended, in field order. ``own``: the
        user's item indices left out of the counts (default: the request's history)."""
        if self.trends is not None:
            inp = with_trends(inp, self.trends, index_of)
        if self.covisit is not None:
            inp = with_covisit(inp, self.covisit, index_of, own)
        if self.demographics is not None:
            inp = with_demographics(inp, self.demographics, index_of, own)
        if self.ease is not None:
            inp = with_ease(inp, self.ease, index_of, own)
        return inp

    def save(self, run_dir: Path) -> None:
        for name, (file, _) in FILES.items():
            table = getattr(self, name)
            if table is not None:
                table.save(run_dir / file)

    @classmethod
    def load(cls, run_dir: Path) -> RunTables:
        """The tables whose files the run folder holds."""
        return cls(
            **{
                name: kind.load(run_dir / file)
                for name, (file, kind) in FILES.items()
                if (run_dir / file).is_file()
            }
        )
