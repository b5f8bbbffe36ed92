"""EASE scores with the user's own row left out, by a rank-one update instead of a new inverse;
and the run tables that carry it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ranker.ease import EaseTable
from ranker.prompts import PromptInput, PromptItem
from ranker.run_tables import TABLE_HISTORY, RunTables

NUM_ITEMS = 30
LAM = 5.0  # small: the 40 toy users must move the scores


def sequences(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.choice(np.arange(1, NUM_ITEMS + 1), size=int(rng.integers(3, 12)), replace=False)
        for _ in range(40)
    ]


def brute_force(train: list[np.ndarray], history: np.ndarray, items: np.ndarray) -> np.ndarray:
    """EASE fitted from scratch on ``train``: B = I - P / diag(P), zero diagonal."""
    x = np.zeros((len(train), NUM_ITEMS + 1))
    for user, seq in enumerate(train):
        x[user, seq] = 1.0
    p = np.linalg.inv(x.T @ x + LAM * np.eye(NUM_ITEMS + 1))
    b = np.eye(NUM_ITEMS + 1) - p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return b[np.unique(history)].sum(axis=0)[items]


def test_leaving_a_users_row_out_equals_refitting_without_it():
    train = sequences()
    table = EaseTable.build(train, NUM_ITEMS, LAM)
    items = np.arange(1, NUM_ITEMS + 1)  # history items among them: their own weight is 0
    for user in (0, 3, 17):
        history = train[user][:4]
        got = table.scores(history, items, own=train[user])
        want = brute_force(train[:user] + train[user + 1 :], history, items)
        np.testing.assert_allclose(got, want, atol=1e-10)
    nobody = np.zeros(0, np.int64)
    np.testing.assert_allclose(
        table.scores(train[5], items, own=nobody), brute_force(train, train[5], items), atol=1e-10
    )


def test_a_training_list_does_not_find_its_target_through_its_own_row():
    """Ten users watch 1 then 2; user 0 alone also watched 3. Left out, user 0's row says
    nothing about 3; counted, it ties 3 to user 0's history."""
    train = [np.array([1, 2])] * 10 + [np.array([4, 5])] * 10
    train[0] = np.array([1, 2, 3])
    table = EaseTable.build(train, 5, lam=1.0)
    own = table.scores(np.array([1, 2]), np.array([3, 4]), own=train[0])
    counted = table.scores(np.array([1, 2]), np.array([3, 4]), own=np.zeros(0, np.int64))
    assert counted[0] > counted[1] + 0.05
    assert abs(own[0] - own[1]) < 1e-9  # no one else watched 3: no evidence either way


def test_features_are_standardised_over_the_list_and_unknown_items_count_nothing():
    table = EaseTable.build(sequences(), NUM_ITEMS, LAM)
    items = np.array([0, 4, 9, 12, 20])
    column = table.features(np.array([1, 2, 3]), items)
    assert column.shape == (5, 1) and column.dtype == np.float32
    assert abs(column.mean()) < 1e-5 and abs(column.std() - 1.0) < 1e-4
    assert table.scores(np.array([1, 2, 3]), items, own=np.array([1, 2, 3]))[0] == 0.0
    flat = table.features(np.zeros(0, np.int64), items)  # no history: no spread
    assert not flat.any()


def test_a_history_beyond_the_training_row_keeps_the_update_finite():
    """Serving leaves out the request's history, which may hold items the table never saw
    with this user (later events, or a new user): the score stays finite."""
    table = EaseTable.build(sequences(), NUM_ITEMS, LAM)
    history = np.arange(1, NUM_ITEMS + 1)
    assert np.isfinite(table.scores(history[:20], history[20:], own=history)).all()


def test_run_tables_round_trip_and_append_in_one_order(tmp_path: Path):
    table = EaseTable.build(sequences(), NUM_ITEMS, LAM)
    tables = RunTables(ease=table)
    assert RunTables().empty and not tables.empty
    tables.save(tmp_path)
    back = RunTables.load(tmp_path)
    assert back.ease is not None and back.trends is None and back.covisit is None
    np.testing.assert_array_equal(back.ease.counts, table.counts)
    assert back.ease.lam == LAM
    index = {str(k): k for k in range(1, NUM_ITEMS + 1)}
    inp = PromptInput(
        history=[PromptItem("h", item_id="1"), PromptItem("h", item_id="2")],
        candidates=[PromptItem(str(k), item_id=str(k)) for k in (3, 4, 5)],
        candidate_context=np.ones((3, 1), np.float32),
    )
    out = back.apply(inp, index)
    assert out.candidate_context.shape == (3, 2) and (out.candidate_context[:, 0] == 1).all()
    expected = table.features(np.array([1, 2]), np.array([3, 4, 5]))
    np.testing.assert_allclose(out.candidate_context[:, 1:], expected, atol=1e-6)


def test_the_tables_read_the_whole_known_history_not_the_shown_items():
    """The gateway shows the ranker a few recent items but passes every known one
    (``history_ids``); the tables read those, cut to the feature store's window, so a served
    request gets the columns training computed from the same history."""
    from feature_store.writer import DEFAULT_HISTORY_CAP

    assert TABLE_HISTORY == DEFAULT_HISTORY_CAP  # the store keeps what the tables read
    table = EaseTable.build(sequences(), NUM_ITEMS, LAM)
    index = {str(k): k for k in range(1, NUM_ITEMS + 1)}
    known = [str(k) for k in range(1, 11)]
    candidates = [PromptItem(str(k), item_id=str(k)) for k in (20, 21, 22, 23)]
    shown = PromptInput(
        history=[PromptItem("h", item_id=i) for i in known[-2:]],
        candidates=candidates,
        history_ids=known,
    )
    full = PromptInput(history=[PromptItem("h", item_id=i) for i in known], candidates=candidates)
    tables = RunTables(ease=table)
    np.testing.assert_allclose(
        tables.apply(shown, index).candidate_context, tables.apply(full, index).candidate_context
    )
    assert not np.allclose(
        tables.apply(shown, index).candidate_context,
        tables.apply(
            PromptInput(history=shown.history, candidates=candidates), index
        ).candidate_context,
    )
    long = ["25"] * 50 + [str(1 + k % 10) for k in range(TABLE_HISTORY)]  # 25: out of the window
    window = PromptInput(history=shown.history, candidates=candidates, history_ids=long)
    cut = PromptInput(
        history=shown.history, candidates=candidates, history_ids=long[-TABLE_HISTORY:]
    )
    served = tables.apply(window, index).candidate_context
    np.testing.assert_allclose(served, tables.apply(cut, index).candidate_context)
    items = np.array([20, 21, 22, 23])
    assert not np.allclose(served, table.features(np.array([25, *range(1, 11)]), items))
