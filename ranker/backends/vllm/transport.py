"""HTTP exchanges with one vLLM server, mapped onto the client's typed errors.

One ``httpx.AsyncClient`` with keep-alive connections, a cap on requests in flight, and bounded
retries (tenacity, exponential back-off) on connection errors only: nothing reached the server,
so a retry cannot score a prompt twice. Reads have no httpx timeout: each call's deadline bounds
them (the caller's ``asyncio.timeout``), so there is one budget, not two.

Transport failures, timeouts and 5xx are unavailability; 4xx and malformed bodies are bad
responses; a 404 from ``/v1/completions`` means the adapter is not served (``AdapterNotServed``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from ranker.backends.vllm.config import VLLMConfig
from ranker.backends.vllm.errors import (
    AdapterNotServed,
    VLLMBadResponse,
    VLLMTimeout,
    VLLMUnavailable,
)

_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout)  # the request never left this process


class Transport:
    """JSON requests to one server; safe to share between concurrent calls."""

    def __init__(self, config: VLLMConfig, transport: httpx.AsyncBaseTransport | None = None):
        self.base_url = config.base_url
        self._config = config
        self._semaphore = asyncio.Semaphore(config.max_concurrency)
        self._client = httpx.AsyncClient(
            base_url=config.base_url,
            timeout=httpx.Timeout(None, connect=config.connect_timeout_s),
            limits=httpx.Limits(
                max_connections=config.max_concurrency,
                max_keepalive_connections=config.max_concurrency,
            ),
            transport=transport,
            trust_env=False,
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def health(self) -> str | None:
        """None when ``/health`` answers 200, else what went wrong (one short probe)."""
        try:
            response = await self._client.get("/health", timeout=self._config.connect_timeout_s)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        return None if response.status_code == 200 else f"/health answered {response.status_code}"

    async def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """One exchange (connect errors retried), decoded as JSON or raised as a typed error."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_NOT_SENT),
            stop=stop_after_attempt(self._config.connect_retries + 1),
            wait=wait_exponential(multiplier=self._config.retry_backoff_s),
            reraise=True,
        )
        async with self._semaphore:
            try:
                async for attempt in retrying:
                    with attempt:
                        response = await self._client.request(
                            method, path, json=body, headers=headers
                        )
            except _NOT_SENT as exc:
                raise VLLMUnavailable(
                    "connect", f"cannot connect to vLLM at {self.base_url}: {exc}"
                ) from None
            except httpx.TimeoutException as exc:
                raise VLLMTimeout(f"vLLM at {self.base_url} timed out: {exc!r}") from None
            except httpx.HTTPError as exc:
                raise VLLMUnavailable(
                    "connect", f"vLLM at {self.base_url} dropped the request: {exc!r}"
                ) from None
        return decode(response, path)


def decode(response: httpx.Response, path: str) -> Any:
    """The JSON body of a 2xx answer; the typed error of any other."""
    if response.status_code == 404 and path == "/v1/completions":
        raise AdapterNotServed("http_4xx", f"vLLM {path}: {error_text(response)}")
    if response.status_code >= 500:
        raise VLLMUnavailable(
            "http_5xx", f"vLLM {path} answered {response.status_code}: {error_text(response)}"
        )
    if response.status_code >= 400:
        raise VLLMBadResponse(
            "http_4xx", f"vLLM {path} answered {response.status_code}: {error_text(response)}"
        )
    try:
        return response.json()
    except ValueError:
        raise VLLMBadResponse(
            "malformed", f"vLLM {path} answered non-JSON: {response.text[:200]!r}"
        ) from None


def error_text(response: httpx.Response) -> str:
    """The OpenAI-style ``error.message`` of an answer, else the start of its body."""
    try:
        return str(response.json()["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return response.text[:300]
