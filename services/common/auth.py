"""Optional API keys: when ``TANDEM_API_KEYS`` is set, business routes need one of them.

A key comes as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``; health and metrics
stay open for probes and scrapers. Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from services.common.errors import ServiceError

_bearer = HTTPBearer(auto_error=False, description="An API key as a Bearer token.")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key.")


def key_matches(given: str, keys: list[SecretStr]) -> bool:
    encoded = given.encode()
    return any(hmac.compare_digest(encoded, key.get_secret_value().encode()) for key in keys)


async def require_api_key(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header_key: Annotated[str | None, Depends(_header)],
) -> None:
    keys: list[SecretStr] = request.app.state.api_keys
    if not keys:
        return
    given = header_key or (bearer.credentials if bearer is not None else None)
    if given is None:
        raise ServiceError(
            401,
            "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not key_matches(given, keys):
        raise ServiceError(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})


ApiKeyDep = Annotated[None, Depends(require_api_key)]
