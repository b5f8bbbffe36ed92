"""The ``POST /retrieve`` contract: history in, top-k candidates (+ user embedding) out."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from services.common.ids import MAX_LIST, Count, ItemId

MAX_K = 200
MAX_EXCLUDE = 1000


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    history: list[ItemId] = Field(
        max_length=MAX_LIST,
        description="Oldest first; the last max_len items are used. Empty = popular items. "
        "Unknown items are rejected (422).",
    )
    k: Count = Field(20, ge=1, le=MAX_K)
    exclude: list[ItemId] = Field(default_factory=list, max_length=MAX_EXCLUDE)
    include_user_embedding: bool = Field(
        False, description="Also return the user's sequence embedding (the ranker's user token)."
    )


class Candidate(BaseModel):
    item_id: str
    score: float


class RetrieveResponse(BaseModel):
    candidates: list[Candidate]
    user_embedding: list[float] | None = None
    source: Literal["retriever", "popularity"] = Field(
        description="popularity when the history was empty."
    )
