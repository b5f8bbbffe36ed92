"""The stages of ``/recommend``: small objects, cheap to build, loaded in the app's lifespan.

user features (1 Redis round trip) -> retrieval top-N (+ user embedding) -> item features
(1 round trip) -> hybrid prompt (off the event loop) -> ranker letter log-probs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ranker.backends.base import RankerBackend, RankerUnavailable, RenderedPrompt
from ranker.prompts import PromptInput
from ranker.verbalizer import to_candidate_order
from services.common.context import current_request_id
from services.gateway.sources import CandidateSource, RetrievalUnavailable, Retrieved
from tandem.priority import lower_thread_priority

if TYPE_CHECKING:
    from feature_store.client import UserRead
    from feature_store.schema import ItemRecord

log = logging.getLogger(__name__)


class FeatureStore(Protocol):
    """What the gateway reads from the feature store (``feature_store.client``)."""

    async def read_user(self, user_id: str) -> UserRead: ...

    async def read_items(self, version: int, item_ids: Sequence[str]) -> dict[str, ItemRecord]: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


class PromptRenderer(Protocol):
    """``ranker.core.Ranker``'s prompt side: tokenizer, prompt config, projectors, orders."""

    def render_all(self, inp: PromptInput) -> tuple[list[RenderedPrompt], np.ndarray]: ...


class UserStage:
    """feature_user: the user's record and the feature version, in one round trip."""

    name = "feature_user"

    def __init__(self, store: FeatureStore):
        self.store = store

    async def load(self) -> None:
        if not await self.store.ping():
            log.warning("feature store not reachable at start-up; requests will degrade")

    async def __call__(self, user_id: str) -> UserRead:
        return await self.store.read_user(user_id)


class RetrievalStage:
    """retrieval: the top-N candidates for a history (history and ``exclude`` never returned)."""

    name = "retrieval"

    def __init__(self, source: CandidateSource, num_candidates: int):
        self.source = source
        self.num_candidates = num_candidates

    async def load(self) -> None:
        await self.source.start()

    async def __call__(self, history: Sequence[str], exclude: Sequence[str]) -> Retrieved:
        retrieved = await self.source.retrieve(history, self.num_candidates, exclude)
        if not retrieved.candidates:
            raise RetrievalUnavailable("retrieval returned no candidates")
        return retrieved


class ItemStage:
    """feature_items: candidate and recent-history item records, in one round trip."""

    name = "feature_items"

    def __init__(self, store: FeatureStore):
        self.store = store

    async def load(self) -> None:
        """Shares the user stage's connection pool."""

    async def __call__(self, version: int, item_ids: Sequence[str]) -> dict[str, ItemRecord]:
        return await self.store.read_items(version, list(dict.fromkeys(item_ids)))


class PromptStage:
    """prompt: the hybrid prompt(s) (text + projected soft tokens) in the ranker's orders.

    Tokenising and projecting are CPU work: they run in a small thread pool of their own, so
    the event loop keeps serving other requests meanwhile (a shadow's pool at a lower OS
    priority, ``nice``, so its rendering yields the cores to served requests).
    """

    name = "prompt"

    def __init__(self, renderer: PromptRenderer, workers: int = 2, nice: int = 0):
        self.renderer = renderer
        self.pool = ThreadPoolExecutor(
            max_workers=workers,
            thread_name_prefix="prompt",
            initializer=lower_thread_priority,
            initargs=(nice,),
        )

    async def load(self) -> None:
        """The renderer arrives loaded (tokenizer, projectors)."""

    async def __call__(self, inp: PromptInput) -> Prompts:
        loop = asyncio.get_running_loop()
        prompts, orders = await loop.run_in_executor(self.pool, self.renderer.render_all, inp)
        return Prompts(prompts, orders)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class RankerStage:
    """ranker: one forward pass per order -> log-probabilities of the candidates' letters.

    A backend that is down at start-up (e.g. vLLM still loading) is started again in the
    background every ``retry_s``; until then requests fall back to retriever order.
    """

    name = "ranker"

    def __init__(self, backend: RankerBackend, retry_s: float = 5.0):
        self.backend = backend
        self.retry_s = retry_s
        self._retry: asyncio.Task[None] | None = None

    async def load(self) -> None:
        try:
            await self.backend.start()
        except RankerUnavailable as exc:
            log.warning("ranker unavailable at start-up, retrying in the background: %s", exc)
            self._retry = asyncio.create_task(self._start_later(), name="ranker-start")

    async def _start_later(self) -> None:
        while True:
            await asyncio.sleep(self.retry_s)
            try:
                await self.backend.start()
            except RankerUnavailable as exc:
                log.warning("ranker still unavailable: %s", exc)
                continue
            log.info("ranker started")
            return

    async def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry
        await self.backend.close()

    async def __call__(self, prompts: Prompts, deadline_s: float) -> np.ndarray:
        scores = await self.backend.score(
            prompts.prompts, request_id=current_request_id(), deadline_s=deadline_s
        )
        return to_candidate_order(np.stack(scores), prompts.orders).astype(np.float64)


@dataclass(frozen=True)
class Prompts:
    """Rendered prompts and, per prompt, the candidate order it shows (``[P, n]``)."""

    prompts: list[RenderedPrompt]
    orders: np.ndarray
