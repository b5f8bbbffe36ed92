"""Every error leaves the services as one shape: RFC 9457 ``application/problem+json``.

``problem_response`` is the single builder; the handlers below route FastAPI's validation
errors and Starlette's HTTP errors through it. Unexpected exceptions are turned into a 500 by
the request middleware (which knows the request id), never a stack trace.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common.context import current_request_id

PROBLEM_MEDIA_TYPE = "application/problem+json"
MAX_LISTED_ERRORS = 10


class Problem(BaseModel):
    """RFC 9457 problem details, plus the request id and (for 422) the individual errors."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str | None = None
    request_id: str | None = None


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_MEDIA_TYPE


class ServiceError(Exception):
    """An error a route raises on purpose; becomes a problem with this status and detail."""

    def __init__(self, status: int, detail: str, *, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


def problem_response(
    status: int,
    detail: str,
    *,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> ProblemResponse:
    """The one problem+json builder: title from the status, detail says what to change."""
    body = Problem(
        title=HTTPStatus(status).phrase,
        status=status,
        detail=detail,
        instance=instance,
        request_id=current_request_id(),
        **extensions,
    )
    return ProblemResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries documenting problem+json bodies for these statuses."""
    schema = {"$ref": "#/components/schemas/Problem"}
    return {
        status: {
            "description": HTTPStatus(status).phrase,
            "content": {PROBLEM_MEDIA_TYPE: {"schema": schema}},
        }
        for status in statuses
    }


def _location(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) if parts else "body"


def validation_detail(errors: list[dict[str, Any]]) -> str:
    """A readable one-line summary of pydantic errors, e.g. ``k: Input should be <= 20``."""
    shown = [f"{_location(tuple(e.get('loc', ())))}: {e.get('msg', 'invalid')}" for e in errors]
    more = len(shown) - MAX_LISTED_ERRORS
    text = "; ".join(shown[:MAX_LISTED_ERRORS])
    return text + (f"; and {more} more" if more > 0 else "")


async def _validation_handler(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    listed = [
        {
            "loc": _location(tuple(e.get("loc", ()))),
            "msg": str(e.get("msg", "")),
            "type": e.get("type"),
        }
        for e in errors[:MAX_LISTED_ERRORS]
    ]
    return problem_response(
        422, validation_detail(errors), instance=request.url.path, errors=listed
    )


async def _http_handler(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).description
    if exc.status_code == 404:
        detail = f"no route {request.url.path}; see /docs for the API"
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}"
    return problem_response(
        exc.status_code, detail, instance=request.url.path, headers=getattr(exc, "headers", None)
    )


async def _service_handler(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, ServiceError)
    return problem_response(exc.status, exc.detail, instance=request.url.path, headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(ServiceError, _service_handler)
