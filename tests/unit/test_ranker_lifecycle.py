"""Each candidate's use before the decision and its age, strictly causal; the run tables that
carry them, and the signal rows that keep them on their own scale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ranker.lifecycle import DAY, LifecycleTable
from ranker.prompts import PromptInput, PromptItem, reorder
from ranker.run_tables import RunTables
from ranker.signals import candidate_signals, signal_dim

T0 = 880_000_000  # epoch seconds, in ML-100K's years
#            item 1: days 0, 1, 5     item 2: day 3     item 3: never
TIMES = np.array([T0 + 5 * DAY, T0, T0 + DAY, T0 + 3 * DAY])
ITEMS = np.array([1, 1, 1, 2])
NUM_ITEMS = 3


def table() -> LifecycleTable:
    return LifecycleTable.build(TIMES, ITEMS, NUM_ITEMS)


def test_a_decision_sees_only_interactions_before_it():
    got = table().features(T0 + 3 * DAY, np.array([1, 2, 3]))
    # item 1: two before (days 0 and 1), first 3 days ago; item 2's day-3 one is not before
    np.testing.assert_allclose(got[0], [np.log1p(2), np.log1p(3), 0.0], rtol=1e-6)
    np.testing.assert_allclose(got[1], [0.0, 0.0, 1.0])
    np.testing.assert_allclose(got[2], [0.0, 0.0, 1.0])
    later = table().features(T0 + 3 * DAY + 1, np.array([2]))
    np.testing.assert_allclose(later[0], [np.log1p(1), np.log1p(1 / DAY), 0.0], rtol=1e-6)


def test_serving_now_reads_the_tables_end_and_unknown_items_are_never_seen():
    got = table().features(None, np.array([1, 0, 99]))
    end = T0 + 5 * DAY + 1
    np.testing.assert_allclose(got[0], [np.log1p(3), np.log1p((end - T0) / DAY), 0.0], rtol=1e-6)
    np.testing.assert_allclose(got[1:], [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    # today's clock, years after the data, sees the ages training saw
    np.testing.assert_allclose(table().features(T0 + 9_000 * DAY, np.array([1])), got[:1])


def test_run_tables_round_trip_and_append_the_columns_as_measures(tmp_path: Path):
    RunTables(lifecycle=table()).save(tmp_path)
    back = RunTables.load(tmp_path)
    assert back.lifecycle is not None and back.ease is None
    np.testing.assert_array_equal(back.lifecycle.times, table().times)
    inp = PromptInput(
        history=[PromptItem("h", item_id="3")],
        candidates=[PromptItem(str(k), item_id=str(k)) for k in (1, 2)],
        timestamp=float(T0 + 2 * DAY),
        candidate_context=np.ones((2, 1), np.float32),
    )
    out = back.apply(inp, {str(k): k for k in range(1, NUM_ITEMS + 1)})
    np.testing.assert_array_equal(out.candidate_context, inp.candidate_context)  # untouched
    want = table().features(T0 + 2 * DAY, np.array([1, 2]))
    np.testing.assert_allclose(out.candidate_measures, want)
    np.testing.assert_allclose(reorder(out, [1, 0]).candidate_measures, want[::-1])


def test_measures_keep_their_size_outside_the_context_groups_scale():
    rng = np.random.default_rng(0)
    n, d = 6, 4
    user, items, history = rng.standard_normal(d), rng.standard_normal((n, d)), np.zeros((0, d))
    scores, measures = items @ user, rng.standard_normal((n, 2))

    def rows(context):
        return candidate_signals(user, items, history, scores, context, True, True, measures)

    small, large = rows(np.ones((n, 1)) * np.arange(n)[:, None]), rows(100.0 * rng.random((n, 1)))
    width = signal_dim(d, d) + 1
    assert small.shape == (n, width + 4)
    # whatever the context's spread, the measures read the same: centred, then standardised
    np.testing.assert_allclose(small[:, width:], large[:, width:], rtol=1e-6)
    np.testing.assert_allclose(small[:, width : width + 2], measures - measures.mean(0), rtol=1e-5)
    standardised = small[:, width + 2 :]
    np.testing.assert_allclose(np.sqrt((standardised**2).mean(0)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(standardised.mean(0), 0.0, atol=1e-6)


def test_a_table_without_interactions_is_refused():
    with pytest.raises(ValueError, match="at least one"):
        LifecycleTable.build(np.array([], dtype=np.int64), np.array([], dtype=np.int64), 3)
