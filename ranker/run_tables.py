"""``RunTables``: the per-candidate evidence a ranker run carries beside its item rows.

Each table turns (user, history, candidates) into a few columns appended to the candidates'
context (the lifecycle's to their measures, kept on their own scale: ``ranker.signals``), and is
built from training interactions only: recent popularity (``ranker.trends``),
what other people watched next (``ranker.covisit``), lift in the user's groups
(``ranker.demographics``), what the whole history predicts (``ranker.ease``) and where each
candidate stood in its life at the decision (``ranker.lifecycle``). Training,
evaluation and serving append them through this one ``apply``, in this one order, so the rows
a ranker serves are the rows it was trained on; ``save``/``load`` keep each table in its own
safetensors file in the run folder.

The history they read is the user's *known* history (``PromptInput.history_ids``: the gateway
passes every item the feature store holds), not the few items a prompt shows, cut to the
newest ``TABLE_HISTORY``: the feature store keeps that many per user, so training, evaluation
and serving all read the same window. The items left out of the counts (``own``, "other
people" in each table) default to that window; training passes the user's whole training
sequence, which is what the tables counted.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from ranker.covisit import COVISIT_FILE, CovisitTable
from ranker.demographics import DEMOGRAPHICS_FILE, DemographicTable
from ranker.ease import EASE_FILE, EaseTable
from ranker.lifecycle import LIFECYCLE_FILE, LifecycleTable
from ranker.prompts import PromptInput, appended_columns
from ranker.trends import TREND_FILE, TrendTable

TABLE_HISTORY = 200  # newest history items the tables read: the feature store's history cap
FILES = {
    "trends": (TREND_FILE, TrendTable),
    "covisit": (COVISIT_FILE, CovisitTable),
    "demographics": (DEMOGRAPHICS_FILE, DemographicTable),
    "ease": (EASE_FILE, EaseTable),
    "lifecycle": (LIFECYCLE_FILE, LifecycleTable),
}


@dataclass(frozen=True)
class RunTables:
    trends: TrendTable | None = None  # recent popularity per item and day
    covisit: CovisitTable | None = None  # other people's item-to-item co-visitation
    demographics: DemographicTable | None = None  # item popularity by user group
    ease: EaseTable | None = None  # the history's EASE score, the user's own row left out
    lifecycle: LifecycleTable | None = None  # consumed before the decision, days since first

    @property
    def empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))

    def apply(
        self, inp: PromptInput, index_of: dict[str, int], own: np.ndarray | None = None
    ) -> PromptInput:
        """``inp`` with every present table's columns appended, in field order (the lifecycle's
        as measures). ``own``: the user's item indices left out of the counts (default: the
        history window)."""
        ids = inp.history_ids if inp.history_ids is not None else [h.item_id for h in inp.history]
        window = list(ids)[-TABLE_HISTORY:]  # cut before the lookups: a given history may be long
        history = np.array([index_of.get(i, 0) for i in window], dtype=np.int64)
        # unknown candidates (no id, or one outside the run's table) read index 0: zero counts
        items = np.array([index_of.get(c.item_id, 0) for c in inp.candidates], dtype=np.int64)
        own = history if own is None else np.asarray(own, dtype=np.int64)
        columns = []
        if self.trends is not None:
            columns.append(self.trends.features(inp.timestamp, items))
        if self.covisit is not None:
            columns.append(self.covisit.features(history, items, own))
        if self.demographics is not None:
            columns.append(self.demographics.features(inp.user_attributes, items, own))
        if self.ease is not None:
            columns.append(self.ease.features(history, items, own))
        if columns:
            context = appended_columns(inp.candidate_context, np.concatenate(columns, axis=1))
            inp = replace(inp, candidate_context=context)
        if self.lifecycle is not None:  # on its own scale (ranker.signals: measures)
            measures = appended_columns(
                inp.candidate_measures, self.lifecycle.features(inp.timestamp, items)
            )
            inp = replace(inp, candidate_measures=measures)
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
