"""Where the gateway's candidates come from: the retriever in-process, or the retrieval service.

Both give the same ``Retrieved`` (top-k with scores + the user's sequence embedding) and raise
``RetrievalUnavailable`` for anything that is not an answer, so the pipeline degrades the
same way whichever is deployed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import httpx
import numpy as np

from services.common.context import REQUEST_ID_HEADER, current_request_id

if TYPE_CHECKING:
    from retriever.core import Retriever


class RetrievalUnavailable(Exception):
    """No candidates now: the service is down, slow, or answered with an error."""


@dataclass(frozen=True)
class Retrieved:
    candidates: list[tuple[str, float]]
    user_embedding: np.ndarray | None


class CandidateSource(Protocol):
    name: str

    async def start(self) -> None: ...

    async def retrieve(
        self, history: Sequence[str], k: int, exclude: Sequence[str]
    ) -> Retrieved: ...

    async def ready(self) -> bool: ...

    async def close(self) -> None: ...


class LocalCandidates:
    """The retriever in this process (embedded mode): ONNX + Faiss in a worker thread."""

    name = "inprocess"

    def __init__(self, retriever: Retriever):
        self.retriever = retriever

    async def start(self) -> None:
        """Nothing to connect: the retriever is loaded."""

    async def retrieve(self, history: Sequence[str], k: int, exclude: Sequence[str]) -> Retrieved:
        try:
            candidates, user_vector = await asyncio.to_thread(
                self.retriever.retrieve_with_user_vector, list(history), k, list(exclude)
            )
        except (ValueError, KeyError, RuntimeError) as exc:
            raise RetrievalUnavailable(f"in-process retrieval failed: {exc}") from exc
        return Retrieved(list(candidates), np.asarray(user_vector, dtype=np.float32))

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        """The retriever holds no connections."""


class RemoteCandidates:
    """The retrieval service over HTTP; passes the request id and the API key along."""

    name = "http"

    def __init__(self, base_url: str, *, api_key: str | None = None, max_connections: int = 64):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.max_connections = max_connections
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            limits=httpx.Limits(
                max_connections=self.max_connections,
                max_keepalive_connections=self.max_connections,
            ),
            timeout=httpx.Timeout(5.0, connect=1.0),
        )

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RetrievalUnavailable("retrieval client not started")
        return self._client

    async def retrieve(self, history: Sequence[str], k: int, exclude: Sequence[str]) -> Retrieved:
        body = {
            "history": list(history),
            "k": k,
            "exclude": list(exclude),
            "include_user_embedding": True,
        }
        request_id = current_request_id()
        headers = {REQUEST_ID_HEADER: request_id} if request_id else {}
        try:
            response = await self.client.post("/retrieve", json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise RetrievalUnavailable(
                f"retrieval service at {self.base_url} unreachable: {type(exc).__name__}"
            ) from exc
        if response.status_code != 200:
            raise RetrievalUnavailable(
                f"retrieval service answered {response.status_code}: {_detail(response)}"
            )
        try:
            payload = response.json()
            candidates = [(str(c["item_id"]), float(c["score"])) for c in payload["candidates"]]
            embedding = payload.get("user_embedding")
        except (ValueError, KeyError, TypeError) as exc:
            raise RetrievalUnavailable(f"malformed retrieval response: {exc}") from exc
        vector = None if embedding is None else np.asarray(embedding, dtype=np.float32)
        return Retrieved(candidates, vector)

    async def ready(self) -> bool:
        try:
            response = await self.client.get("/readyz", timeout=1.0)
        except (httpx.HTTPError, RetrievalUnavailable):
            return False
        return response.status_code == 200

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", ""))[:200]
    except ValueError:
        return response.text[:200]
