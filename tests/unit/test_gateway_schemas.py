"""The request contract: id rules, bounds, strict types, unknown fields."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.gateway.schemas import RecommendRequest
from services.retrieval.schemas import RetrieveRequest


@pytest.mark.parametrize("user_id", ["u1", "Ünïcödé 🎬", "x" * 64, "a b", "42"])
def test_printable_ids_up_to_64_characters_are_accepted(user_id):
    assert RecommendRequest.model_validate({"user_id": user_id}).user_id == user_id


@pytest.mark.parametrize("user_id", ["", "x" * 65, "a\nb", "tab\t", "\x00", "del\x7f", "c1\x85"])
def test_empty_long_and_control_character_ids_are_rejected(user_id):
    with pytest.raises(ValidationError, match="user_id"):
        RecommendRequest.model_validate({"user_id": user_id})


@pytest.mark.parametrize("k, ok", [(1, True), (20, True), (4.0, True), (0, False), (21, False),
                                   (4.5, False), ("4", False), (True, False)])  # fmt: skip
def test_k_is_a_whole_number_from_1_to_20(k, ok):
    if ok:
        assert RecommendRequest.model_validate({"user_id": "u", "k": k}).k == int(k)
    else:
        with pytest.raises(ValidationError, match="k"):
            RecommendRequest.model_validate({"user_id": "u", "k": k})


def test_lists_are_bounded_and_unknown_fields_rejected():
    RecommendRequest.model_validate(
        {"user_id": "u", "history": ["i"] * 200, "exclude": ["i"] * 200}
    )
    for body in (
        {"user_id": "u", "history": ["i"] * 201},
        {"user_id": "u", "exclude": ["i"] * 201},
        {"user_id": "u", "limit": 3},
        {"user_id": "u", "history": "i1"},
    ):
        with pytest.raises(ValidationError):
            RecommendRequest.model_validate(body)


def test_history_absent_differs_from_empty():
    assert RecommendRequest.model_validate({"user_id": "u"}).history is None
    assert RecommendRequest.model_validate({"user_id": "u", "history": []}).history == []


def test_retrieve_request_bounds():
    assert RetrieveRequest.model_validate({"history": ["a"], "k": 200}).k == 200
    with pytest.raises(ValidationError):
        RetrieveRequest.model_validate({"history": ["a"], "k": 201})
    with pytest.raises(ValidationError):
        RetrieveRequest.model_validate({"history": ["a\x01"]})
