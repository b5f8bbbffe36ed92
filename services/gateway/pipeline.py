"""``POST /recommend`` as a pipeline of small stages, each with a deadline and a fallback.

user features (1 Redis round trip) -> retrieval top-N (+ user embedding) -> item features
(1 round trip) -> hybrid prompt -> ranker letter log-probs -> fusion with the retriever's
scores -> top-k. A failing or slow stage never fails the request: the pipeline answers from
what it has (retriever order, or popularity), names the reason in ``degraded`` and counts it.
The stages live in ``stages.py``, the deadline/fallback bookkeeping in ``trace.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from feature_store.near_cache import StaleUserRead
from ranker.backends.base import RankerError, RankerTimeout
from ranker.fusion import fuse, order
from ranker.prompts import PromptError, PromptInput, PromptItem
from services.common.fallbacks import Fallback
from services.common.metrics import GatewayMetrics
from services.common.settings import GatewaySettings
from services.gateway.schemas import ModelInfo, RecommendedItem, RecommendRequest, RecommendResponse
from services.gateway.sources import Retrieved
from services.gateway.stages import (
    FeatureStore,
    ItemStage,
    PromptStage,
    RankerStage,
    RetrievalStage,
    UserStage,
)
from services.gateway.trace import Trace

if TYPE_CHECKING:
    from feature_store.client import UserRead
    from feature_store.schema import ItemRecord
    from retriever.core import Retriever

log = logging.getLogger(__name__)
MAX_LISTED_IDS = 5
STORE_ERRORS = {Exception: Fallback.FEATURE_STORE_UNAVAILABLE}  # any store failure degrades
RANKER_ERRORS = {  # a backend failure, or inputs it cannot use; anything else is a bug
    RankerTimeout: Fallback.RANKER_TIMEOUT,  # the backend's own deadline
    RankerError: Fallback.RANKER_UNAVAILABLE,
    PromptError: Fallback.RANKER_UNAVAILABLE,
}

__all__ = ["FeatureStore", "RecommendPipeline"]


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
                errors=STORE_ERRORS,
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
        budget = self.settings.ranker_deadline_ms / 1000
        rendered = await trace.attempt(
            self.prompt.name,
            self.prompt(inp),
            budget,
            on_timeout=Fallback.RANKER_TIMEOUT,
            errors=RANKER_ERRORS,
        )
        if rendered is None:
            return retriever_order()
        deadline = min(budget, trace.remaining_s())
        letters = await trace.attempt(
            self.ranker.name,
            self.ranker(rendered, deadline),
            deadline,
            on_timeout=Fallback.RANKER_TIMEOUT,
            errors=RANKER_ERRORS,
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
