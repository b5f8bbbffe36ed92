"""A bounded in-process near-cache of user records, for answering through a Redis outage.

Every user record the gateway reads from Redis is remembered (newest ``max_users``, each for
``ttl_s`` after it was read). The cache is consulted only when the store fails: unreachable,
an error, or no answer within ``deadline_s``. A read it answers is a :class:`StaleUserRead`, so
the pipeline labels the response ``feature_store_stale``. It never answers while Redis works,
so a fresh write (a new publish, an event) is never hidden by an older cached copy, and it
never records writes itself: nothing is served from it as if it had been written.

``deadline_s`` should be shorter than the gateway's feature-store stage deadline: the store
then gives up early enough for the cached answer to arrive before the stage is cut off.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from feature_store.client import FeatureStoreUnavailable, UserRead
from feature_store.schema import ItemRecord, UserRecord
from tandem.metric_sets import per_registry


@dataclass(frozen=True)
class StaleUserRead(UserRead):
    """A user read answered from the near-cache because the store failed.

    ``age_s`` is how long ago Redis gave this record; ``error_type`` is why Redis was skipped.
    """

    age_s: float = 0.0
    error_type: str = "timeout"


@dataclass(frozen=True)
class NearCacheMetrics:
    """Fallback lookups by result (hit = a stale answer, miss = the request degrades further)."""

    lookups: Counter
    users: Gauge


@per_registry
def near_cache_metrics(registry: CollectorRegistry) -> NearCacheMetrics:
    """The near-cache metric set of ``registry`` (created once; caches share it)."""
    metrics = NearCacheMetrics(
        lookups=Counter(
            "tandem_feature_store_near_cache_lookups_total",
            "User lookups in the near-cache while the feature store failed, by result "
            "(hit: answered stale; miss: not cached or expired).",
            ["result"],
            registry=registry,
        ),
        users=Gauge(
            "tandem_feature_store_near_cache_users",
            "User records held in the near-cache.",
            registry=registry,
        ),
    )
    for result in ("hit", "miss"):
        metrics.lookups.labels(result=result)
    return metrics


class FeatureReader(Protocol):
    """What the near-cache wraps: ``feature_store.client.FeatureStoreClient``'s read side."""

    async def read_user(self, user_id: str) -> UserRead: ...

    async def read_items(self, version: int, item_ids: Sequence[str]) -> dict[str, ItemRecord]: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


class NearCache:
    """A feature store whose user reads survive a store outage for recently read users."""

    def __init__(
        self,
        store: FeatureReader,
        *,
        max_users: int,
        ttl_s: float,
        deadline_s: float | None = None,
        registry: CollectorRegistry = REGISTRY,
        clock: Callable[[], float] = time.monotonic,
    ):
        if max_users < 1:
            raise ValueError(f"max_users must be at least 1, got {max_users}")
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.store = store
        self.max_users, self.ttl_s, self.deadline_s = max_users, ttl_s, deadline_s
        self._clock = clock
        self._metrics = near_cache_metrics(registry)
        self._entries: OrderedDict[str, tuple[float, int, UserRecord]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def read_user(self, user_id: str) -> UserRead:
        """The store's answer; when the store fails, the cached record as a StaleUserRead.

        Raises FeatureStoreUnavailable when the store failed and nothing fresh enough is cached.
        """
        try:
            async with asyncio.timeout(self.deadline_s):
                read = await self.store.read_user(user_id)
        except TimeoutError as exc:
            stale = self._cached(user_id, "timeout")
            if stale is None:
                raise FeatureStoreUnavailable(
                    f"feature store user read: no answer within {self.deadline_s or 0:.3f} s "
                    "(near-cache deadline) and the user is not in the near-cache",
                    "timeout",
                ) from exc
            return stale
        except FeatureStoreUnavailable as exc:
            stale = self._cached(user_id, exc.error_type)
            if stale is None:
                raise
            return stale
        self._remember(user_id, read)
        return read

    async def read_items(self, version: int, item_ids: Sequence[str]) -> dict[str, ItemRecord]:
        return await self.store.read_items(version, item_ids)

    async def ping(self) -> bool:
        return await self.store.ping()

    async def close(self) -> None:
        await self.store.close()

    def _remember(self, user_id: str, read: UserRead) -> None:
        """Keep what Redis said; a user Redis no longer has is dropped, never served stale."""
        if read.user is None or read.version is None:
            self._entries.pop(user_id, None)
        else:
            self._entries[user_id] = (self._clock(), read.version, read.user)
            self._entries.move_to_end(user_id)
            while len(self._entries) > self.max_users:
                self._entries.popitem(last=False)
        self._metrics.users.set(len(self._entries))

    def _cached(self, user_id: str, error_type: str) -> StaleUserRead | None:
        """The user's record if read within ``ttl_s`` (counted as a hit), else None (a miss)."""
        entry = self._entries.get(user_id)
        if entry is not None and self._clock() - entry[0] > self.ttl_s:
            del self._entries[user_id]
            self._metrics.users.set(len(self._entries))
            entry = None
        if entry is None:
            self._metrics.lookups.labels(result="miss").inc()
            return None
        self._metrics.lookups.labels(result="hit").inc()
        read_at, version, user = entry
        return StaleUserRead(version, user, age_s=self._clock() - read_at, error_type=error_type)
