"""The ``POST /recommend`` and ``POST /events`` contracts (docs/architecture.md, "Contracts"):
request and response families."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from services.common.fallbacks import Fallback
from services.common.ids import MAX_LIST, Count, ItemId, UserId
from services.common.variants import DEFAULT_VARIANT

MAX_K = 20
MAX_EVENTS = 500


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    user_id: UserId = Field(description="The user to recommend for (1-64 printable characters).")
    k: Count = Field(10, ge=1, le=MAX_K, description="How many items to return.")
    history: list[ItemId] | None = Field(
        None,
        max_length=MAX_LIST,
        description="Oldest first. When given it replaces the stored history for this request "
        "(the stored record is unchanged). Unknown items are dropped and reported in warnings.",
    )
    exclude: list[ItemId] = Field(
        default_factory=list, max_length=MAX_LIST, description="Items never to recommend."
    )


class RecommendedItem(BaseModel):
    item_id: str
    score: float = Field(
        description="Fused log-score: higher is better (comparable within a list)."
    )
    rank: int = Field(ge=1, description="1-based position in this list.")
    retrieval_rank: int = Field(ge=1, description="1-based position in the retriever's list.")
    title: str | None = None


class ModelInfo(BaseModel):
    retriever_run: str
    ranker_run: str | None = Field(description="None when the ranker is zero-shot or disabled.")
    backend: str = Field(description="Ranker backend: inprocess, vllm or none.")
    feature_version: int | None = Field(description="Feature-store version read, if any.")
    rank_weight: float = Field(
        description="Fusion weight served: configured, else tuned by the ranker run on "
        "validation, else 0 (retriever order: an unproven ranker is not served)."
    )
    ranker_note: str | None = Field(
        None, description="Which ranker is served and why, or why none is (e.g. no run)."
    )
    variant: str = Field(
        DEFAULT_VARIANT,
        description="The ranker variant that served this answer (TANDEM_VARIANTS; 'default' "
        "when none are configured). A user keeps their variant until the split changes.",
    )


class RecommendResponse(BaseModel):
    request_id: str
    user_id: str
    items: list[RecommendedItem]
    degraded: list[Fallback] = Field(
        description="Fallbacks taken: ranker_unavailable, ranker_timeout, "
        "feature_store_unavailable, feature_store_stale (the user's record came from the "
        "gateway's near-cache while the store was down), retrieval_unavailable, cold_start, "
        "deadline_exceeded."
    )
    warnings: list[str]
    model: ModelInfo
    timings_ms: dict[str, float] = Field(
        description="Per stage: feature_user, retrieval, feature_items, prompt, ranker, total."
    )


class Event(BaseModel):
    """One interaction, as a product backend reports it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    event_id: ItemId = Field(
        description="Idempotency key (1-64 printable characters): an id already accepted in "
        "the last 48 h counts as a duplicate and is applied once."
    )
    user_id: UserId
    item_id: ItemId = Field(description="Must be in the served catalog.")
    type: Literal["interaction", "view", "click", "purchase"] = Field(
        "interaction", description="What the user did; every type extends the history."
    )
    ts: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="Epoch seconds; default: server time."
    )
    request_id: ItemId | None = Field(
        None, description="The /recommend answer this responds to (kept for attribution)."
    )


# Each event is validated on its own (a bad one is rejected, the rest go in), so the body
# accepts any JSON objects while the schema documents the Event shape.
RawEvent = Annotated[dict[str, Any], WithJsonSchema(Event.model_json_schema())]


class EventsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    events: list[RawEvent] = Field(min_length=1, max_length=MAX_EVENTS)


class RejectedEvent(BaseModel):
    index: int = Field(ge=0, description="0-based position in the request's events.")
    event_id: str | None = Field(description="The event's id when it had a usable one.")
    detail: str = Field(description="Why it was rejected and what to change.")


class EventsResponse(BaseModel):
    accepted: int = Field(ge=0, description="New events, now visible to /recommend.")
    duplicates: int = Field(ge=0, description="Events whose event_id was already accepted.")
    rejected: list[RejectedEvent]
