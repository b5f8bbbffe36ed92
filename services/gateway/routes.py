"""``POST /recommend``: validate, run the pipeline, return its answer (a few lines per route)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from services.common.auth import ApiKeyDep
from services.common.context import current_request_id, new_request_id
from services.common.errors import problem_responses
from services.gateway.pipeline import RecommendPipeline
from services.gateway.schemas import RecommendRequest, RecommendResponse


async def get_pipeline(request: Request) -> RecommendPipeline:
    return request.app.state.pipeline


async def get_request_id() -> str:
    return current_request_id() or new_request_id()


PipelineDep = Annotated[RecommendPipeline, Depends(get_pipeline)]
RequestIdDep = Annotated[str, Depends(get_request_id)]

router = APIRouter(tags=["recommend"])


@router.post(
    "/recommend",
    response_model=RecommendResponse,
    responses=problem_responses(400, 401, 413, 422, 500),
)
async def recommend(
    body: RecommendRequest, pipeline: PipelineDep, request_id: RequestIdDep, _: ApiKeyDep
) -> RecommendResponse:
    """Top-k items for a user: retrieval, then the LLM ranker, fused; degrades, never fails
    because one dependency is down (see ``degraded``)."""
    return await pipeline(body, request_id)
