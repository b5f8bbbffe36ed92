"""Group lifts: what a user's gender / age band / occupation group watches more than others."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ranker.demographics import DemographicTable, attributes_of, group_of
from ranker.prompts import PromptInput, PromptItem
from ranker.run_tables import RunTables
from tandem.data.users import UserProfile

# Items 1..4. Women watch 1, men 2; everyone watches 3; item 4 only the first woman.
ATTRIBUTES = [
    {"gender": "F", "age": 24, "occupation": "writer"},
    {"gender": "F", "age": 61, "occupation": "writer"},
    {"gender": "M", "age": 24, "occupation": "doctor"},
    {"gender": "M", "age": None, "occupation": None},
]
TRAIN = [np.array([1, 3, 4]), np.array([1, 3]), np.array([2, 3]), np.array([2, 3])]


def table() -> DemographicTable:
    return DemographicTable.build(ATTRIBUTES, TRAIN, num_items=4)


def test_an_items_lift_follows_the_users_group():
    lifts = table().features({"gender": "F"}, np.array([1, 2, 3]), own=np.array([], np.int64))
    gender = lifts[:, 0]
    assert gender[0] > 0 > gender[1]  # women watch 1 more than everyone, 2 less
    assert abs(gender[2]) < abs(gender[0])  # everyone watches 3
    assert not lifts[:, 1:].any()  # age and occupation unknown: no evidence


def test_the_users_own_interactions_are_left_out():
    """Her own viewing of item 4 is not evidence for her: it leaves the counts, so a training
    list never finds its own target through the table."""
    train = [TRAIN[0], TRAIN[1], np.array([2, 3, 4]), TRAIN[3]]  # a man watched 4 too
    t = DemographicTable.build(ATTRIBUTES, train, num_items=5)
    # women: 5 interactions, 1 of item 4; everyone: 10, 2 of item 4; 6 = items + padding row
    hers = t.features(ATTRIBUTES[0], np.array([4]), own=train[0])[0, 0]
    assert np.isclose(hers, np.log((1 - 1 + 1) / (5 + 6)) - np.log((2 - 1 + 1) / (10 + 6)))
    counted = t.features(ATTRIBUTES[0], np.array([4]), own=np.array([], np.int64))[0, 0]
    assert np.isclose(counted, np.log((1 + 1) / (5 + 6)) - np.log((2 + 1) / (10 + 6)))


def test_ages_are_grouped_in_bands_and_unknowns_are_none():
    assert group_of("age", 24) == group_of("age", 20) != group_of("age", 61)
    assert group_of("gender", None) is None and group_of("occupation", "") is None
    assert attributes_of(None) is None
    profile = UserProfile("u1", age=30, gender="F", occupation="writer")
    assert attributes_of(profile) == {"gender": "F", "age": 30, "occupation": "writer"}


def test_it_round_trips_and_appends_to_the_candidates_context(tmp_path: Path):
    t = table()
    t.save(tmp_path / "d.safetensors")
    back = DemographicTable.load(tmp_path / "d.safetensors")
    assert back.names == t.names
    index = {"a": 1, "b": 2, "c": 3}
    inp = PromptInput(
        history=[PromptItem("C", item_id="c")],
        candidates=[PromptItem("A", item_id="a"), PromptItem("B", item_id="b")],
        candidate_context=np.ones((2, 1), np.float32),
        user_attributes=ATTRIBUTES[2],
    )
    out = RunTables(demographics=back).apply(inp, index)
    assert out.candidate_context.shape == (2, 4) and (out.candidate_context[:, 0] == 1).all()
    expected = t.features(ATTRIBUTES[2], np.array([1, 2]), own=np.array([3]))
    assert np.allclose(out.candidate_context[:, 1:], expected)
