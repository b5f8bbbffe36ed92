"""Request-scoped context: the request id, visible to logs and to outgoing calls."""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

request_id_var: ContextVar[str | None] = ContextVar("tandem_request_id", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex


def valid_request_id(value: str) -> bool:
    """1-64 characters of letters, digits and ``. _ : -`` (safe in logs and headers)."""
    return bool(_REQUEST_ID.match(value))


def current_request_id() -> str | None:
    return request_id_var.get()
