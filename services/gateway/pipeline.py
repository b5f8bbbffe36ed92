"""``POST /recommend`` as a pipeline of small stages, each with a deadline and a fallback.

user features (1 Redis round trip) -> retrieval top-N (+ user embedding) -> item features
(1 round trip) -> hybrid prompt -> ranker letter log-probs -> fusion with the retriever's
scores -> top-k. A failing or slow stage never fails the request: the pipeline answers from
what it has (retriever order, or popularity), names the reason in ``degraded`` and counts it.
The stages live in ``stages.py``, the deadline/fallback bookkeeping in ``trace.py``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from feature_store.near_cache import StaleUserRead
from ranker.backends.base import RankerError, RankerTimeout
from ranker.demographics import attributes_of
from ranker.fusion import fuse, order
from ranker.prompts import PromptError, PromptInput, PromptItem
from services.common.fallbacks import Fallback
from services.common.metrics import GatewayMetrics
from services.common.settings import GatewaySettings
from services.gateway.request_items import RequestItems
from services.gateway.schemas import ModelInfo, RecommendedItem, RecommendRequest, RecommendResponse
from services.gateway.shadow import FollowUps, Job, ShadowScorer
from services.gateway.sources import Retrieved
from services.gateway.stages import FeatureStore, ItemStage, RetrievalStage, UserStage
from services.gateway.trace import Trace
from services.gateway.variants import Variant, Variants

if TYPE_CHECKING:
    from feature_store.client import UserRead
    from feature_store.schema import ItemRecord
    from retriever.core import Retriever

log = logging.getLogger(__name__)
STORE_ERRORS = {Exception: Fallback.FEATURE_STORE_UNAVAILABLE}  # any store failure degrades
RANKER_ERRORS = {  # a backend failure, or inputs it cannot use; anything else is a bug
    RankerTimeout: Fallback.RANKER_TIMEOUT,  # the backend's own deadline
    RankerError: Fallback.RANKER_UNAVAILABLE,
    PromptError: Fallback.RANKER_UNAVAILABLE,
}

# Called with (request_id, user_id, variant, item ids in rank order) after each answer is sent.
AnswerHook = Callable[[str, str, str, Sequence[str]], Awaitable[None]]
# Schedules follow-up work after the response, like ``BackgroundTasks.add_task``.
Defer = Callable[..., Any]

__all__ = ["AnswerHook", "FeatureStore", "RecommendPipeline"]


@dataclass
class Ranked:
    """The final candidate list before the top-k cut, in candidate (retrieval) order."""

    ids: list[str]
    scores: np.ndarray  # fused log-scores
    titles: dict[str, str]


@dataclass
class Candidates:
    """The retrieved candidates of one request and what was read to rank them; the shadows
    score the same ones (reusing the records and prompt input when the served path built them)."""

    ids: list[str]
    base: np.ndarray  # retriever scores, candidate order
    recent: list[str]  # history items shown in the prompt
    history: list[str]  # every known history item: what the ranker's run tables read
    version: int | None  # feature version the user record came from
    preference: str | None
    attributes: dict[str, object] | None  # gender / age / occupation (ranker.demographics)
    user_embedding: np.ndarray | None
    store_down: bool
    decided_at: float = field(default_factory=time.time)
    records: dict[str, ItemRecord] | None = None
    inp: PromptInput | None = None


class RecommendPipeline:
    """The whole request: stages + fallbacks. ``user``/``items`` may be None (no feature store);
    a variant without prompt/ranker stages (the ranker disabled) serves retriever order.

    ``variants`` picks the ranker variant per user; shadows and ``on_answer`` (request id,
    user id, variant, item ids; the attribution log) run after the answer, off the response path.
    """

    def __init__(
        self,
        *,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        retriever: Retriever,
        retrieval: RetrievalStage,
        user: UserStage | None,
        items: ItemStage | None,
        variants: Variants,
        on_answer: AnswerHook | None = None,
    ):
        self.settings = settings
        self.metrics = metrics
        self.retriever = retriever
        self.catalog = retriever.catalog
        self.request_items = RequestItems(self.catalog)
        self.retrieval, self.user, self.items = retrieval, user, items
        self.variants = variants
        self.on_answer = on_answer
        self.follow_ups = FollowUps()

    @property
    def model(self) -> ModelInfo:
        """What the control variant serves (start-up logs)."""
        return self.variants.control.model

    @property
    def stages(self) -> list:
        return [s for s in (self.user, self.retrieval, self.items) if s]

    async def load(self) -> None:
        for stage in self.stages:
            await stage.load()
        await self.variants.load()

    async def close(self) -> None:
        await self.follow_ups.close()
        if self.user is not None:
            await self.user.store.close()
        await self.retrieval.source.close()
        await self.variants.close()

    async def __call__(
        self, request: RecommendRequest, request_id: str, after: Defer | None = None
    ) -> RecommendResponse:
        """The answer; follow-up work (shadows, the answer hook) goes to ``after`` (a route's
        ``BackgroundTasks.add_task``: it runs once the response is sent), else starts now."""
        s = self.settings
        variant = self.variants.assign(request.user_id)
        shadows = self.variants.shadows()
        trace = Trace(self.metrics, time.monotonic() + s.deadline_ms / 1000, variant=variant.name)
        exclude = self.request_items.known_exclude(request.exclude, trace)

        # Given history: retrieval need not wait for the user record, so both run at once.
        early: asyncio.Task[Retrieved | None] | None = None
        if request.history is not None:
            history = self.request_items.known_history(request.history, trace, given=True)
            if history:
                early = asyncio.create_task(self._retrieve(history, exclude, trace))
        user_read, store_down = await self._read_user(request.user_id, trace)
        user = user_read.user if user_read is not None else None
        if request.history is None:
            stored = list(user.history) if user is not None else []
            history = self.request_items.known_history(stored, trace, given=False)

        candidates: Candidates | None = None
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
                candidates = Candidates(
                    ids=[item_id for item_id, _ in retrieved.candidates],
                    base=np.array([score for _, score in retrieved.candidates], dtype=np.float64),
                    recent=history[-s.prompt_history :] if s.prompt_history else [],
                    history=history,
                    version=user_read.version if user_read is not None else None,
                    preference=user.preference if user is not None else None,
                    attributes=attributes_of(user),
                    user_embedding=retrieved.user_embedding,
                    store_down=store_down,
                )
                ranked = await self._rank(variant, candidates, trace)
        trace.record("total", time.perf_counter() - trace.started)
        response = self._respond(request, request_id, ranked, trace, user_read, variant)
        jobs = self._follow_ups(response, ranked, candidates, shadows)
        if jobs:
            if after is None:
                await self.follow_ups.start(jobs)
            else:
                after(self.follow_ups.start, jobs)
        return response

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
            errors=STORE_ERRORS,
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
            errors={Exception: Fallback.RETRIEVAL_UNAVAILABLE},
        )

    async def _rank(self, variant: Variant, c: Candidates, trace: Trace) -> Ranked:
        records: dict[str, ItemRecord] = {}

        def retriever_order() -> Ranked:
            return self._ranked(c.ids, fuse(c.base, None, 0.0), records)

        if variant.prompt is None or variant.ranker is None:
            return retriever_order()
        if c.store_down:  # no item features: the prompt would not be the one the ranker knows
            return retriever_order()
        if self.items is not None and c.version is not None:
            read = await trace.attempt(
                self.items.name,
                self.items(c.version, c.ids + c.recent),
                self.settings.feature_store_deadline_ms / 1000,
                on_timeout=Fallback.FEATURE_STORE_UNAVAILABLE,
                errors=STORE_ERRORS,
            )
            if read is None:
                return retriever_order()
            records = c.records = read
        if trace.remaining_s() * 1000 < self.settings.ranker_min_budget_ms:
            trace.degrade(Fallback.DEADLINE_EXCEEDED)
            return retriever_order()

        inp = c.inp = self._prompt_input(c, records)
        budget = self.settings.ranker_deadline_ms / 1000
        rendered = await trace.attempt(
            variant.prompt.name,
            variant.prompt(inp),
            budget,
            on_timeout=Fallback.RANKER_TIMEOUT,
            errors=RANKER_ERRORS,
        )
        if rendered is None:
            return retriever_order()
        deadline = min(budget, trace.remaining_s())
        letters = await trace.attempt(
            variant.ranker.name,
            variant.ranker(rendered, deadline),
            deadline,
            on_timeout=Fallback.RANKER_TIMEOUT,
            errors=RANKER_ERRORS,
        )
        if letters is None:
            return retriever_order()
        try:
            fused = fuse(c.base, letters, variant.model.rank_weight)
        except ValueError as exc:  # a backend that answered for another number of candidates
            log.warning("ranker answered %s", exc)
            trace.degrade(Fallback.RANKER_UNAVAILABLE)
            return retriever_order()
        position = int(np.flatnonzero(order(fused) == 0)[0])
        self.metrics.ranker_hit_position.observe(position)
        return self._ranked(c.ids, fused, records)

    def _prompt_input(self, c: Candidates, records: dict[str, ItemRecord]) -> PromptInput:
        return PromptInput(
            history=[self._prompt_item(i, records) for i in c.recent],
            candidates=[self._prompt_item(i, records) for i in c.ids],
            preference=c.preference,
            user_attributes=c.attributes,
            history_ids=c.history,
            user_embedding=c.user_embedding,
            retriever_scores=c.base,
            timestamp=c.decided_at,
        )

    async def _shadow_input(self, c: Candidates) -> PromptInput | None:
        """The served prompt input, or (the served variant did not rank) one built from a read
        of its own, off the response path; None when the store was down for the request."""
        if c.inp is not None:
            return c.inp
        if c.store_down:
            return None
        if c.records is None and self.items is not None and c.version is not None:
            c.records = await self.items(c.version, c.ids + c.recent)
        c.inp = self._prompt_input(c, c.records or {})
        return c.inp

    def _follow_ups(
        self,
        response: RecommendResponse,
        ranked: Ranked,
        candidates: Candidates | None,
        shadows: list[ShadowScorer],
    ) -> list[Job]:
        jobs: list[Job] = []
        if self.on_answer is not None:
            item_ids = [item.item_id for item in response.items]
            jobs.append(
                functools.partial(
                    self.on_answer,
                    response.request_id,
                    response.user_id,
                    response.model.variant,
                    item_ids,
                )
            )
        if candidates is not None:
            inputs = functools.partial(self._shadow_input, candidates)
            jobs += [
                functools.partial(shadow, inputs, candidates.base, ranked.scores)
                for shadow in shadows
            ]
        return jobs

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
            return PromptItem(title=self.request_items.titles([item_id])[0], item_id=item_id)
        return PromptItem(
            title=record.title,
            caption=record.caption,
            embedding=record.embedding,
            item_id=item_id,
        )

    def _respond(
        self,
        request: RecommendRequest,
        request_id: str,
        ranked: Ranked,
        trace: Trace,
        user_read: UserRead | None,
        variant: Variant,
    ) -> RecommendResponse:
        positions = order(ranked.scores)[: request.k]
        ids = [ranked.ids[i] for i in positions]
        missing = [i for i in ids if i not in ranked.titles]
        fallback = dict(zip(missing, self.request_items.titles(missing), strict=True))
        titles = {**fallback, **ranked.titles}
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
            model=variant.model.model_copy(update={"feature_version": version}),
            timings_ms=trace.timings_ms,
        )
