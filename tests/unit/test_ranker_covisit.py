"""Co-visitation: counted as documented, the user's own pairs left out, saved losslessly."""

from __future__ import annotations

import numpy as np

from ranker.covisit import WINDOW, CovisitTable
from ranker.prompts import PromptInput, PromptItem
from ranker.run_tables import RunTables


def test_pairs_are_counted_within_the_window_in_order():
    seq = np.arange(1, WINDOW + 3)  # 1 .. WINDOW + 2
    table = CovisitTable.build([seq], num_items=WINDOW + 2)
    assert table.counts[1, 2] == 1 and table.counts[1, WINDOW + 1] == 1
    assert table.counts[1, WINDOW + 2] == 0  # beyond the window
    assert table.counts[2, 1] == 0  # order matters


def test_a_users_own_pairs_never_reach_their_features():
    rng = np.random.default_rng(0)
    mine = rng.choice(np.arange(1, 40), size=25, replace=False)
    others = [rng.choice(np.arange(1, 40), size=20, replace=False) for _ in range(30)]
    everyone = CovisitTable.build([mine, *others], num_items=40)
    without_me = CovisitTable.build(others, num_items=40)
    history, candidates = mine[:15], np.array([mine[15], mine[16], *range(1, 10)])
    nothing = np.zeros(0, dtype=np.int64)
    clean = without_me.features(history, candidates, own=nothing)
    np.testing.assert_array_equal(everyone.features(history, candidates, own=mine), clean)
    # Leaving out only the history would leak the target: my pair last item -> target counts.
    leaked = everyone.features(history, candidates, own=history)
    assert leaked[0, 0] > clean[0, 0]


def test_the_table_saves_and_loads_losslessly(tmp_path):
    rng = np.random.default_rng(1)
    table = CovisitTable.build([rng.integers(1, 30, size=50) for _ in range(5)], num_items=30)
    table.save(tmp_path / "covisit.safetensors")
    np.testing.assert_array_equal(
        CovisitTable.load(tmp_path / "covisit.safetensors").counts, table.counts
    )


def test_covisit_columns_follow_the_existing_context():
    table = CovisitTable.build([np.array([1, 2, 3])], num_items=3)
    index = {"a": 1, "b": 2, "c": 3}
    inp = PromptInput(
        history=[PromptItem("a", item_id="a")],
        candidates=[PromptItem("c", item_id="c"), PromptItem("x", item_id="unknown")],
        candidate_context=np.array([[7.0], [8.0]]),
    )
    out = RunTables(covisit=table).apply(inp, index, own=np.zeros(0, np.int64)).candidate_context
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out[:, 0], [7.0, 8.0])
    np.testing.assert_allclose(out[0, 1:], np.log1p([1.0, 1.0]))  # a -> c, once
    np.testing.assert_allclose(out[1, 1:], 0.0)  # an unknown item counts nothing
