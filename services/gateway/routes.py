"""``POST /recommend`` and ``POST /events``: validate, call one function, return its answer."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Depends, Request

from services.common.auth import ApiKeyDep
from services.common.context import current_request_id, new_request_id
from services.common.errors import problem_responses
from services.gateway.events import EventIngest
from services.gateway.pipeline import RecommendPipeline
from services.gateway.schemas import (
    EventsRequest,
    EventsResponse,
    RecommendRequest,
    RecommendResponse,
)


async def get_pipeline(request: Request) -> RecommendPipeline:
    return request.app.state.pipeline


async def get_events(request: Request) -> EventIngest:
    return request.app.state.events


async def get_request_id() -> str:
    return current_request_id() or new_request_id()


PipelineDep = Annotated[RecommendPipeline, Depends(get_pipeline)]
RequestIdDep = Annotated[str, Depends(get_request_id)]
EventsDep = Annotated[EventIngest, Depends(get_events)]

router = APIRouter(tags=["recommend"])


@router.post(
    "/recommend",
    response_model=RecommendResponse,
    responses=problem_responses(400, 401, 413, 422, 500),
)
async def recommend(
    body: RecommendRequest,
    pipeline: PipelineDep,
    request_id: RequestIdDep,
    after: BackgroundTasks,
    _: ApiKeyDep,
) -> RecommendResponse:
    """Top-k items for a user: retrieval, then the LLM ranker of the user's variant, fused;
    degrades, never fails because one dependency is down (see ``degraded``). Shadow scoring
    and the answer log start after the response is sent."""
    return await pipeline(body, request_id, after.add_task)


@router.post(
    "/events",
    response_model=EventsResponse,
    responses=problem_responses(400, 401, 413, 422, 500, 503),
    tags=["events"],
)
async def events(body: EventsRequest, ingest: EventsDep, _: ApiKeyDep) -> EventsResponse:
    """Record 1-500 interactions; the next /recommend of each user sees them. Idempotent by
    event_id; a bad event is rejected with a reason while the rest go in; 503 + Retry-After
    (nothing recorded) when the store is unreachable."""
    return await ingest(body)
