"""``POST /recommend`` as a pipeline of small stages, each with a deadline and a fallback.

user features (1 Redis round trip) -> retrieval top-N (+ user embedding) -> item features
(1 round trip) -> hybrid prompt -> ranker letter log-probs -> fusion with the retriever's
scores -> top-k. A failing or slow stage never fails the request: the pipeline answers from
what it has (retriever order, or popularity), names the reason in ``degraded`` and counts it.
Stages are cheap to construct; ``load()`` connects/warms them in the app's lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np

from feature_store.near_cache import StaleUserRead
from ranker.backends.base import (
    RankerBackend,
    RankerError,
    RankerTimeout,
    RankerUnavailable,
    RenderedPrompt,
)
from ranker.fusion import fuse, order
from ranker.prompts import PromptError, PromptInput, PromptItem
from ranker.verbalizer import to_candidate_order
from services.common.context import current_request_id
from services.common.fallbacks import Fallback
from services.common.metrics import GatewayMetrics
from services.common.settings import GatewaySettings
from services.gateway.schemas import ModelInfo, RecommendedItem, RecommendRequest, RecommendResponse
from services.gateway.sources import CandidateSource, RetrievalUnavailable, Retrieved

if TYPE_CHECKING:
    from feature_store.client import UserRead
    from feature_store.schema import ItemRecord
    from retriever.core import Retriever

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_LISTED_IDS = 5


class FeatureStore(Protocol):
    """What the gateway reads from the feature store (``feature_store.client``)."""

    async def read_user(self, user_id: str) -> UserRead: ...

    async def read_items(self, version: int, item_ids: Sequence[str]) -> dict[str, ItemRecord]: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


class PromptRenderer(Protocol):
    """``ranker.core.Ranker``'s prompt side: tokenizer, prompt config, projectors, orders."""

    def render_all(self, inp: PromptInput) -> tuple[list[RenderedPrompt], np.ndarray]: ...


class StageDeadline(Exception):
    """A stage ran past its deadline; ``overall`` when the request's own budget cut it."""

    def __init__(self, stage: str, overall: bool):
        super().__init__(f"{stage} over its deadline")
        self.stage, self.overall = stage, overall


@dataclass
class Trace:
    """Per-request bookkeeping: deadline, timings, fallbacks taken and warnings."""

    metrics: GatewayMetrics
    deadline: float  # time.monotonic() value
    started: float = field(default_factory=time.perf_counter)
    timings_ms: dict[str, float] = field(default_factory=dict)
    degraded: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()

    def degrade(self, reason: Fallback) -> None:
        if reason not in self.degraded:
            self.degraded.append(reason)
            self.metrics.fallbacks.labels(reason.value).inc()

    def record(self, stage: str, seconds: float) -> None:
        self.timings_ms[stage] = round(seconds * 1000, 3)
        self.metrics.observe_stage(stage, seconds)

    async def run(self, stage: str, work: Awaitable[T], stage_deadline_s: float) -> T:
        """Await ``work`` within min(stage deadline, what is left); StageDeadline when over."""
        left = self.remaining_s()
        timeout = min(stage_deadline_s, left)
        start = time.perf_counter()
        try:
            if timeout <= 0:
                raise TimeoutError
            return await asyncio.wait_for(work, timeout)
        except TimeoutError:
            raise StageDeadline(stage, overall=left <= stage_deadline_s) from None
        finally:
            if timeout <= 0 and asyncio.iscoroutine(work):
                work.close()
            self.record(stage, time.perf_counter() - start)

    async def attempt(
        self,
        stage: str,
        work: Awaitable[T],
        deadline_s: float,
        *,
        on_timeout: Fallback,
        on_error: Fallback,
        errors: tuple[type[BaseException], ...] = (Exception,),
    ) -> T | None:
        """``work`` under the stage's deadline; None after recording the fallback taken.

        Over the stage's own deadline -> ``on_timeout``; over the request's -> deadline_exceeded;
        one of ``errors`` -> ``on_error`` (logged). Anything else is a bug and propagates (the
        error envelope answers 500 with the request id; it is never disguised as degradation).
        """
        try:
            return await self.run(stage, work, deadline_s)
        except StageDeadline as exc:
            self.degrade(Fallback.DEADLINE_EXCEEDED if exc.overall else on_timeout)
        except errors as exc:
            if isinstance(exc, RankerTimeout):
                self.degrade(Fallback.RANKER_TIMEOUT)  # the backend's own deadline
            else:
                self.degrade(on_error)
            log.warning("%s failed: %s", stage, exc)
        return None


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
    the event loop keeps serving other requests meanwhile.
    """

    name = "prompt"

    def __init__(self, renderer: PromptRenderer, workers: int = 2):
        self.renderer = renderer
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prompt")

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


@dataclass
class Ranked:
    """The final candidate list before the top-k cut, in candidate (retrieval) order."""

    ids: list[str]
    scores: np.ndarray  # fused log-scores
    titles: dict[str, str]


class RecommendPipeline:
    """The whole request: stages + fallbacks. ``user``/``items``/``prompt``/``ranker`` may be
    None (no feature store, or the ranker disabled): the pipeline then serves retriever order."""

    def __init__(
        self,
        *,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        retriever: Retriever,
        retrieval: RetrievalStage,
        user: UserStage | None,
        items: ItemStage | None,
        prompt: PromptStage | None,
        ranker: RankerStage | None,
        model: ModelInfo,
    ):
        self.settings = settings
        self.metrics = metrics
        self.retriever = retriever
        self.catalog = retriever.catalog
        # Fallback titles when the feature store has none: one array lookup, no pandas per request.
        self._titles = self.catalog.frame["title"].astype(str).to_numpy()
        self.retrieval, self.user, self.items = retrieval, user, items
        self.prompt, self.ranker = prompt, ranker
        self.model = model

    @property
    def stages(self) -> list:
        return [s for s in (self.user, self.retrieval, self.items, self.prompt, self.ranker) if s]

    async def load(self) -> None:
        for stage in self.stages:
            await stage.load()

    async def close(self) -> None:
        if self.user is not None:
            await self.user.store.close()
        await self.retrieval.source.close()
        if self.prompt is not None:
            self.prompt.close()
        if self.ranker is not None:
            await self.ranker.close()

    async def __call__(self, request: RecommendRequest, request_id: str) -> RecommendResponse:
        s = self.settings
        trace = Trace(self.metrics, time.monotonic() + s.deadline_ms / 1000)
        exclude = self._known_exclude(request.exclude, trace)

        # Given history: retrieval need not wait for the user record, so both run at once.
        early: asyncio.Task[Retrieved | None] | None = None
        if request.history is not None:
            history = self._known_history(request.history, trace, given=True)
            if history:
                early = asyncio.create_task(self._retrieve(history, exclude, trace))
        user_read, store_down = await self._read_user(request.user_id, trace)
        user = user_read.user if user_read is not None else None
        if request.history is None:
            stored = list(user.history) if user is not None else []
            history = self._known_history(stored, trace, given=False)

        if not history:
            if not store_down:
                trace.degrade(Fallback.COLD_START)
            ranked = self._popular(history, exclude)
        else:
            retrieved = (
                await early if early is not None else await self._retrieve(history, exclude, trace)
            )
            if retrieved is None:
                ranked = self._popular(history, exclude)
            else:
                version = user_read.version if user_read is not None else None
                preference = user.preference if user is not None else None
                ranked = await self._rank(
                    retrieved, history, version, preference, store_down, trace
                )
        trace.record("total", time.perf_counter() - trace.started)
        return self._respond(request, request_id, ranked, trace, user_read)

    # ---- steps -------------------------------------------------------------------------------

    async def _read_user(self, user_id: str, trace: Trace) -> tuple[UserRead | None, bool]:
        """(the read, whether the store is down); a down store is a fallback, not an error."""
        if self.user is None:
            return None, False
        read = await trace.attempt(
            self.user.name,
            self.user(user_id),
            self.settings.feature_store_deadline_ms / 1000,
            on_timeout=Fallback.FEATURE_STORE_UNAVAILABLE,
            on_error=Fallback.FEATURE_STORE_UNAVAILABLE,  # any store failure degrades
        )
        if read is None:
            return None, True
        stale = isinstance(read, StaleUserRead)  # the store failed; the near-cache answered
        if stale:
            trace.degrade(Fallback.FEATURE_STORE_UNAVAILABLE)
            trace.degrade(Fallback.FEATURE_STORE_STALE)
        return read, stale

    async def _retrieve(
        self, history: list[str], exclude: list[str], trace: Trace
    ) -> Retrieved | None:
        return await trace.attempt(
            self.retrieval.name,
            self.retrieval(history, exclude),
            self.settings.retrieval_deadline_ms / 1000,
            on_timeout=Fallback.RETRIEVAL_UNAVAILABLE,
            on_error=Fallback.RETRIEVAL_UNAVAILABLE,
        )

    async def _rank(
        self,
        retrieved: Retrieved,
        history: list[str],
        version: int | None,
        preference: str | None,
        store_down: bool,
        trace: Trace,
    ) -> Ranked:
        ids = [item_id for item_id, _ in retrieved.candidates]
        base = np.array([score for _, score in retrieved.candidates], dtype=np.float64)
        records: dict[str, ItemRecord] = {}
        recent = history[-self.settings.prompt_history :] if self.settings.prompt_history else []

        def retriever_order() -> Ranked:
            return self._ranked(ids, fuse(base, None, 0.0), records)

        if self.ranker is None or self.prompt is None:
            return retriever_order()
        if store_down:  # no item features: the prompt would not be the one the ranker knows
            return retriever_order()
        if self.items is not None and version is not None:
            read = await trace.attempt(
                self.items.name,
                self.items(version, ids + recent),
                self.settings.feature_store_deadline_ms / 1000,
                on_timeout=Fallback.FEATURE_STORE_UNAVAILABLE,
                on_error=Fallback.FEATURE_STORE_UNAVAILABLE,
            )
            if read is None:
                return retriever_order()
            records = read
        if trace.remaining_s() * 1000 < self.settings.ranker_min_budget_ms:
            trace.degrade(Fallback.DEADLINE_EXCEEDED)
            return retriever_order()

        inp = PromptInput(
            history=[self._prompt_item(i, records) for i in recent],
            candidates=[self._prompt_item(i, records) for i in ids],
            preference=preference,
            user_embedding=retrieved.user_embedding,
            retriever_scores=base,
            timestamp=time.time(),
        )
        ranker_errors = (RankerError, PromptError)  # a backend failure, or inputs it cannot use
        budget = self.settings.ranker_deadline_ms / 1000
        rendered = await trace.attempt(
            self.prompt.name,
            self.prompt(inp),
            budget,
            on_timeout=Fallback.RANKER_TIMEOUT,
            on_error=Fallback.RANKER_UNAVAILABLE,
            errors=ranker_errors,
        )
        if rendered is None:
            return retriever_order()
        deadline = min(budget, trace.remaining_s())
        letters = await trace.attempt(
            self.ranker.name,
            self.ranker(rendered, deadline),
            deadline,
            on_timeout=Fallback.RANKER_TIMEOUT,
            on_error=Fallback.RANKER_UNAVAILABLE,
            errors=ranker_errors,
        )
        if letters is None:
            return retriever_order()
        try:
            fused = fuse(base, letters, self.model.rank_weight)
        except ValueError as exc:  # a backend that answered for another number of candidates
            log.warning("ranker answered %s", exc)
            trace.degrade(Fallback.RANKER_UNAVAILABLE)
            return retriever_order()
        position = int(np.flatnonzero(order(fused) == 0)[0])
        self.metrics.ranker_hit_position.observe(position)
        return self._ranked(ids, fused, records)

    def _popular(self, history: list[str], exclude: list[str]) -> Ranked:
        popular = self.retriever.popular(self.settings.num_candidates, [*history, *exclude])
        ids = [item_id for item_id, _ in popular]
        scores = np.log(np.maximum([score for _, score in popular], 1e-12))
        return self._ranked(ids, np.asarray(scores, dtype=np.float64), {})

    # ---- helpers -----------------------------------------------------------------------------

    def _ranked(self, ids: list[str], scores: np.ndarray, records: dict[str, ItemRecord]) -> Ranked:
        titles = {i: records[i].title for i in ids if i in records}
        return Ranked(ids, scores, titles)

    def _prompt_item(self, item_id: str, records: dict[str, ItemRecord]) -> PromptItem:
        record = records.get(item_id)
        if record is None:
            return PromptItem(title=self._catalog_title(item_id), item_id=item_id)
        return PromptItem(
            title=record.title,
            caption=record.caption,
            embedding=record.embedding,
            item_id=item_id,
        )

    def _catalog_title(self, item_id: str) -> str:
        return self._catalog_titles([item_id])[0]

    def _catalog_titles(self, item_ids: Sequence[str]) -> list[str]:
        return self._titles[self.catalog.index_of(item_ids) - 1].tolist()

    def _known_history(self, history: Sequence[str], trace: Trace, *, given: bool) -> list[str]:
        known, unknown = self.catalog.known(history)
        if unknown:
            source = "history" if given else "stored history"
            trace.warnings.append(
                f"dropped {len(unknown)} unknown {source} item(s): {_listed(unknown)}"
            )
        return known

    def _known_exclude(self, exclude: Sequence[str], trace: Trace) -> list[str]:
        known, unknown = self.catalog.known(exclude)
        if unknown:
            trace.warnings.append(
                f"ignored {len(unknown)} unknown exclude item(s): {_listed(unknown)}"
            )
        return known

    def _respond(
        self,
        request: RecommendRequest,
        request_id: str,
        ranked: Ranked,
        trace: Trace,
        user_read: UserRead | None,
    ) -> RecommendResponse:
        positions = order(ranked.scores)[: request.k]
        ids = [ranked.ids[i] for i in positions]
        missing = [i for i in ids if i not in ranked.titles]
        titles = {**dict(zip(missing, self._catalog_titles(missing), strict=True)), **ranked.titles}
        items = [
            RecommendedItem(
                item_id=item_id,
                score=round(float(ranked.scores[i]), 6),
                rank=rank,
                retrieval_rank=int(i) + 1,
                title=titles[item_id],
            )
            for rank, (i, item_id) in enumerate(zip(positions, ids, strict=True), start=1)
        ]
        if len(items) < request.k:
            trace.warnings.append(f"only {len(items)} item(s) could be recommended")
        version = user_read.version if user_read is not None else None
        return RecommendResponse(
            request_id=request_id,
            user_id=request.user_id,
            items=items,
            degraded=trace.degraded,
            warnings=trace.warnings,
            model=self.model.model_copy(update={"feature_version": version}),
            timings_ms=trace.timings_ms,
        )


def _listed(ids: Sequence[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:MAX_LISTED_IDS])
    return shown + (f" (+{len(ids) - MAX_LISTED_IDS} more)" if len(ids) > MAX_LISTED_IDS else "")
