"""The one request middleware: request id, body limit, catch-all 500, metrics and access log.

Written as plain ASGI (no BaseHTTPMiddleware) so it adds microseconds, not milliseconds, and
sees every response, including the ones produced by exception handlers.
"""

from __future__ import annotations

import logging
import time

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.context import (
    REQUEST_ID_HEADER,
    new_request_id,
    request_id_var,
    valid_request_id,
)
from services.common.errors import problem_response
from services.common.metrics import UNMATCHED_ROUTE, ServiceMetrics

log = logging.getLogger("tandem.access")
errors_log = logging.getLogger("tandem.errors")

_HEADER = REQUEST_ID_HEADER.lower().encode()


class RequestMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: ServiceMetrics, max_body_bytes: int):
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        given = headers.get(_HEADER, b"").decode("latin-1")
        request_id = given if given and valid_request_id(given) else new_request_id()
        token = request_id_var.set(request_id)
        state = {"status": 500, "started": False}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                state["started"] = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (_HEADER, request_id.encode())]
            await send(message)

        try:
            if given and not valid_request_id(given):
                await self._reply(scope, receive, send_with_id, 400, (
                    f"{REQUEST_ID_HEADER} must be 1-64 characters of letters, digits and . _ : -"
                ))  # fmt: skip
                return
            declared = headers.get(b"content-length")
            if declared is not None and (
                not declared.isdigit() or int(declared) > self.max_body_bytes
            ):
                await self._reply(scope, receive, send_with_id, 413, self._too_large())
                return
            await self.app(scope, self._limited(receive), send_with_id)
        except Exception:
            errors_log.exception(
                "unhandled error", extra={"path": scope.get("path"), "method": scope.get("method")}
            )
            if not state["started"]:
                await self._reply(scope, receive, send_with_id, 500, (
                    "internal error; the request id identifies it in the service logs"
                ))  # fmt: skip
        finally:
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED_ROUTE
            self.metrics.observe_http(template, scope["method"], state["status"], elapsed)
            log.info(
                "request",
                extra={
                    "method": scope["method"],
                    "route": template,
                    "status": state["status"],
                    "duration_ms": round(elapsed * 1000, 3),
                },
            )
            request_id_var.reset(token)

    def _too_large(self) -> str:
        return f"request body larger than {self.max_body_bytes} bytes"

    def _limited(self, receive: Receive) -> Receive:
        seen = 0

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    # FastAPI re-raises HTTPException from body reading; the handler shapes it.
                    raise HTTPException(413, self._too_large())
            return message

        return wrapped

    @staticmethod
    async def _reply(scope: Scope, receive: Receive, send: Send, status: int, detail: str) -> None:
        response = problem_response(status, detail, instance=scope.get("path"))
        await response(scope, receive, send)
