"""The ranker variants a gateway serves, and which one serves a request.

Every configured variant is loaded at start-up (variants on the same ranker share its prompt
and ranker stages), so a new split never loads anything: a request picks its variant from the
split active when it starts and keeps it to the end, and a switch is one reference swap. With
variants configured the split lives in Redis (``feature_store.splits``): the gateway stores the
configured split at start-up unless the stored one descends from the same configuration (a
restart keeps a promote), then re-reads it every ``poll_s`` in the background. A stored split
naming a variant this gateway does not have is refused and counted; the last good one serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import redis

from feature_store.splits import Split, SplitError, SplitStore
from ranker.fusion import fuse
from services.common.metrics import GatewayMetrics
from services.gateway.schemas import ModelInfo
from services.gateway.shadow import ShadowScorer
from services.gateway.stages import PromptStage, RankerStage

if TYPE_CHECKING:
    from ranker.prompts import PromptInput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """One named ranker configuration as the pipeline runs it (stages None: retriever order)."""

    name: str
    prompt: PromptStage | None
    ranker: RankerStage | None
    model: ModelInfo  # what responses report: runs, backend, rank_weight, variant
    shadow_deadline_s: float = 2.0  # when this variant shadows another
    shadow_concurrency: int = 2

    @property
    def ranks(self) -> bool:
        return self.prompt is not None and self.ranker is not None

    async def score(self, inp: PromptInput, base: np.ndarray) -> np.ndarray:
        """Fused scores of ``inp``'s candidates, without a trace (the shadow path)."""
        if self.prompt is None or self.ranker is None:
            return fuse(base, None, 0.0)
        prompts = await self.prompt(inp)
        letters = await self.ranker(prompts, self.shadow_deadline_s)
        return fuse(base, letters, self.model.rank_weight)


class Variants:
    """The configured variants, the active split, and the shadows it names."""

    def __init__(
        self,
        variants: Mapping[str, Variant],
        split: Split,
        metrics: GatewayMetrics,
        *,
        store: SplitStore | None = None,
        poll_s: float = 1.0,
    ):
        missing = set(split.names) - set(variants)
        if missing:
            raise ValueError(f"the split names variants that are not configured: {missing}")
        self.by_name = dict(variants)
        self.metrics = metrics
        self.configured = split
        self.store = store
        self.poll_s = poll_s
        self.scorers = {name: ShadowScorer(v, metrics) for name, v in self.by_name.items()}
        self._split = split
        self._watch: asyncio.Task[None] | None = None
        self._publish_gauges()

    @property
    def split(self) -> Split:
        return self._split

    @property
    def control(self) -> Variant:
        return self.by_name[self._split.control]

    def assign(self, user_id: str) -> Variant:
        return self.by_name[self._split.assign(user_id)]

    def shadows(self) -> list[ShadowScorer]:
        return [self.scorers[name] for name in self._split.shadows]

    def stages(self) -> list[PromptStage | RankerStage]:
        """Each distinct prompt and ranker stage once (variants may share them)."""
        found: dict[int, PromptStage | RankerStage] = {}
        for variant in self.by_name.values():
            for stage in (variant.prompt, variant.ranker):
                if stage is not None:
                    found.setdefault(id(stage), stage)
        return list(found.values())

    async def ready(self) -> bool:
        """Whether the ranker of every variant that can serve (not a configured shadow) is up."""
        served = {v.name for v in self.configured.variants if not v.shadow}
        rankers = {id(v.ranker): v.ranker for n, v in self.by_name.items() if n in served}
        return all([await r.backend.ready() for r in rankers.values() if r is not None])

    async def load(self) -> None:
        for stage in self.stages():
            await stage.load()
        if self.store is None:
            return
        try:
            await self._ensure()
        except (redis.RedisError, SplitError) as exc:
            self.metrics.split_errors.inc()
            log.warning("variants: cannot store the split (%s); serving the configured one", exc)
        self._watch = asyncio.create_task(self._watch_store(), name="variants-split")

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        for stage in self.stages():
            if isinstance(stage, PromptStage):
                stage.close()
            else:
                await stage.close()
        if self.store is not None:
            self.store.close()

    def apply(self, split: Split) -> bool:
        """Serve ``split`` from the next request on; False (and counted) if it names a variant
        this gateway does not have."""
        unknown = sorted(set(split.names) - set(self.by_name))
        if unknown:
            self.metrics.split_errors.inc()
            log.warning(
                "variants: refused split v%d: it names %s, not configured here", split.version,
                unknown,
            )  # fmt: skip
            return False
        if split.version != self._split.version:
            log.info(
                "variants: serving split v%d (%s): %s", split.version, split.reason,
                {v.name: v.share for v in split.variants},
            )  # fmt: skip
        self._split = split
        self._publish_gauges()
        return True

    async def refresh(self) -> None:
        """Read the stored split once and serve it if its version differs."""
        assert self.store is not None
        doc = await asyncio.to_thread(self.store.read)
        if doc is None:  # deleted (or never stored: Redis was down at start-up)
            await self._ensure()
        elif doc.active.version != self._split.version:
            self.apply(doc.active)

    async def _ensure(self) -> None:
        assert self.store is not None
        split, stored = await asyncio.to_thread(self.store.ensure, self.configured)
        if stored:
            log.info("variants: stored the configured split as v%d", split.version)
        self.apply(split)

    async def _watch_store(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.refresh()
            except (redis.RedisError, SplitError) as exc:
                self.metrics.split_errors.inc()
                log.warning("variants: cannot read the split (%s); keeping v%d", exc,
                            self._split.version)  # fmt: skip

    def _publish_gauges(self) -> None:
        self.metrics.split_version.set(self._split.version)
        for name in self.by_name:
            share = next((v.share for v in self._split.variants if v.name == name), 0.0)
            self.metrics.variant_share.labels(self.metrics.variant_label(name)).set(share)
