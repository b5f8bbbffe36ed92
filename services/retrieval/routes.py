"""``POST /retrieve``: validate, call the retrieval service object, return its answer."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from services.common.auth import ApiKeyDep
from services.common.errors import problem_responses
from services.retrieval.schemas import RetrieveRequest, RetrieveResponse
from services.retrieval.service import RetrievalService


async def get_service(request: Request) -> RetrievalService:
    return request.app.state.service


ServiceDep = Annotated[RetrievalService, Depends(get_service)]

router = APIRouter(tags=["retrieval"])


@router.post(
    "/retrieve",
    response_model=RetrieveResponse,
    responses=problem_responses(400, 401, 413, 422, 500),
)
async def retrieve(body: RetrieveRequest, service: ServiceDep, _: ApiKeyDep) -> RetrieveResponse:
    """Top-k items for a history (history and ``exclude`` never returned)."""
    return await service(body)
