"""Async feature reads for the request path: one Redis round trip per request stage.

The user stage pipelines ``GET alias`` with ``HGETALL`` of the user under the version this
client last saw and ``LRANGE`` of the user's live tail (events accepted by ``POST /events``,
joined to the snapshot by ``feature_store.live.merge_history``); only when the alias moved does
it read again (the user under the new version, its schema and its events watermark). The
items stage reads every candidate it has not read before under the same version with one
pipelined ``HGETALL`` each (plus the schema if this client has not cached it); the ones it has
come from ``feature_store.item_cache``. Versions are never reused and their items never
rewritten, so a cached schema or item record stays true for as long as its version exists.

Failures split in two: an unreachable or slow Redis raises :class:`FeatureStoreUnavailable`
within ``deadline`` (so the gateway can degrade), while a missing key is a miss and a corrupt
value is logged with its key, counted, and reported as missing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import redis
import redis.asyncio
from prometheus_client import REGISTRY, CollectorRegistry
from redis.exceptions import ClusterError, RedisClusterException

from feature_store.connection import async_client
from feature_store.item_cache import ItemRecordCache
from feature_store.live import ZERO_ID, EventKeys, merge_history, newer_items
from feature_store.metrics import metrics_for
from feature_store.schema import (
    CorruptValueError,
    ItemRecord,
    Keys,
    UserRecord,
    VersionSchema,
    decode_item,
    decode_user,
)

logger = logging.getLogger(__name__)

_SCHEMA_CACHE_SIZE = 8
_LOG_EVERY_S = 60.0  # a corrupt key read on every request is logged once a minute, not each time


class FeatureStoreUnavailable(Exception):
    """Redis did not answer within the deadline (down, slow, or refusing); degrade and go on.

    ``error_type`` is ``timeout``, ``connection`` or ``redis``.
    """

    def __init__(self, message: str, error_type: str):
        super().__init__(message)
        self.error_type = error_type


async def within_deadline(work, deadline: float, what: str):  # type: ignore[no-untyped-def]
    """Await ``work`` under ``deadline`` seconds; every transport failure becomes
    FeatureStoreUnavailable naming ``what`` (the writers' guard: events, answers)."""
    try:
        async with asyncio.timeout(deadline):
            return await work
    except (TimeoutError, redis.TimeoutError) as exc:
        raise FeatureStoreUnavailable(
            f"{what} gave no answer within {deadline * 1000:.0f} ms", "timeout"
        ) from exc
    except (redis.ConnectionError, OSError) as exc:
        raise FeatureStoreUnavailable(f"{what} unreachable: {exc}", "connection") from exc
    except redis.RedisError as exc:
        raise FeatureStoreUnavailable(f"{what} error: {exc}", "redis") from exc


@dataclass(frozen=True)
class UserRead:
    """The serving version (None = nothing published) and the user (None = unknown user)."""

    version: int | None
    user: UserRecord | None


class FeatureStoreClient:
    """Pooled async reads of one namespace; share one instance per process and ``close()`` it.

    ``deadline`` bounds each read end to end (pool wait, connect, retry); by default it is
    ``connect_timeout + 2 * socket_timeout``.
    """

    def __init__(
        self,
        url: str,
        namespace: str = "default",
        *,
        socket_timeout: float = 0.05,
        connect_timeout: float = 0.1,
        cluster: bool = False,
        deadline: float | None = None,
        max_connections: int = 64,
        item_cache_size: int = 0,
        registry: CollectorRegistry = REGISTRY,
    ):
        self.keys = Keys(namespace)
        self.deadline = deadline if deadline is not None else connect_timeout + 2 * socket_timeout
        self._redis = async_client(
            url,
            cluster=cluster,
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
            max_connections=max_connections,
            pool_timeout=self.deadline,
        )
        self._metrics = metrics_for(registry)
        self._version: int | None = None
        self._schemas: OrderedDict[int, VersionSchema] = OrderedDict()
        self._through: dict[int, str] = {}  # version -> last stream id its snapshot includes
        self.events = EventKeys(namespace)
        self._logged: OrderedDict[str, float] = OrderedDict()
        self._items = ItemRecordCache(item_cache_size) if item_cache_size else None

    async def read_user(self, user_id: str) -> UserRead:
        """The serving version and this user's record: one round trip (two if the alias moved)."""
        user = await self._timed("user", self._read_user(user_id))
        found = user.user is not None
        self._metrics.observe_lookups("user", hits=int(found), misses=int(not found))
        return user

    async def read_items(self, version: int, item_ids: Sequence[str]) -> dict[str, ItemRecord]:
        """Records of ``item_ids`` under ``version`` in one round trip; missing ids are absent."""
        unique = list(dict.fromkeys(item_ids))
        if not unique:
            return {}
        cached: dict[str, ItemRecord] = {}
        missing = unique
        if self._items is not None:
            cached, missing = self._items.get_many(version, unique)
            self._metrics.observe_item_cache(hits=len(cached), misses=len(missing))
        read = await self._timed("items", self._read_items(version, missing)) if missing else {}
        if self._items is not None:
            self._items.put_many(version, read)
        items = {i: r for i in unique if (r := cached.get(i) or read.get(i)) is not None}
        self._metrics.observe_lookups("items", hits=len(items), misses=len(unique) - len(items))
        return items

    async def ping(self) -> bool:
        """True when Redis answers within the deadline (readiness checks)."""
        try:
            async with asyncio.timeout(self.deadline):
                return bool(await self._redis.ping())
        except (TimeoutError, redis.RedisError, RedisClusterException, OSError):
            return False

    async def current_version(self) -> int | None:
        """The version the alias points at now (one GET)."""
        raw = await self._timed("user", self._redis.get(self.keys.alias))
        return self._parse_version(raw)

    async def close(self) -> None:
        await self._redis.aclose()

    async def _timed(self, stage: str, work):  # type: ignore[no-untyped-def]
        """Run ``work`` under the deadline; map every transport failure to Unavailable."""
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.deadline):
                return await work
        except (TimeoutError, redis.TimeoutError) as exc:
            error_type, detail = "timeout", f"no answer within {self.deadline * 1000:.0f} ms"
            cause: Exception = exc
        except (redis.ConnectionError, ClusterError, RedisClusterException, OSError) as exc:
            error_type, detail, cause = "connection", str(exc) or type(exc).__name__, exc
        except redis.RedisError as exc:
            error_type, detail, cause = "redis", str(exc) or type(exc).__name__, exc
        finally:
            self._metrics.read_seconds.labels(stage=stage).observe(time.perf_counter() - start)
        self._metrics.observe_error(stage, error_type)
        raise FeatureStoreUnavailable(
            f"feature store {stage} read failed ({error_type}): {detail}", error_type
        ) from cause

    async def _read_user(self, user_id: str) -> UserRead:
        cached = self._version if self._version in self._schemas else None
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(self.keys.alias)
        pipe.lrange(self.events.tail(user_id), 0, -1)
        if cached is not None:
            pipe.hgetall(self.keys.user(cached, user_id))
        replies = await pipe.execute(raise_on_error=False)
        current = self._parse_version(replies[0])
        tail = self._tail(replies[1], user_id)
        if current is None:
            # Nothing published (or Redis lost its data): version numbers may start over, so
            # nothing cached may be trusted any more.
            self._version = None
            self._schemas.clear()
            return UserRead(None, None)
        if current == cached:
            return UserRead(current, self._user(current, user_id, replies[2], tail))
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.user(current, user_id))
        pipe.hgetall(self.keys.schema(current))
        pipe.hgetall(self.events.through)  # a few fields: one per manifest with a watermark
        user_raw, schema_raw, through_raw = await pipe.execute(raise_on_error=False)
        schema = self._remember_schema(current, schema_raw)
        if schema is None:
            return UserRead(current, None)
        through = self._checked(through_raw, self.events.through, "user") or {}
        self._through[current] = _text_or(through.get(schema.manifest_id.encode()), ZERO_ID)
        self._version = current
        self._metrics.version.set(current)
        return UserRead(current, self._user(current, user_id, user_raw, tail))

    def _user(
        self, version: int, user_id: str, raw: object, tail: list[bytes]
    ) -> UserRecord | None:
        """The stored record joined with the live tail (``feature_store.live.merge_history``)."""
        user = self._decode_user(version, user_id, raw)
        schema = self._schemas[version]
        through = self._through.get(version, ZERO_ID)
        if not tail or not newer_items(tail, through):
            return user
        stored = user.history if user is not None else ()
        history = merge_history(stored, tail, through, schema.history_cap)
        if user is None:
            return UserRecord(user_id, history)
        return replace(user, history=history)

    def _tail(self, raw: object, user_id: str) -> list[bytes]:
        """The user's live tail; a value of the wrong type is corrupt and read as empty."""
        if isinstance(raw, Exception):
            if not _wrong_type(raw):
                raise raw
            key = self.events.tail(user_id)
            self._corrupt("user", CorruptValueError(key, "*", f"{type(raw).__name__}: {raw}"))
            return []
        return list(raw or [])  # type: ignore[call-overload]

    async def _read_items(self, version: int, item_ids: list[str]) -> dict[str, ItemRecord]:
        schema = self._schemas.get(version)
        pipe = self._redis.pipeline(transaction=False)
        for item_id in item_ids:
            pipe.hgetall(self.keys.item(version, item_id))
        if schema is None:
            pipe.hgetall(self.keys.schema(version))
        replies = await pipe.execute(raise_on_error=False)
        if schema is None:
            schema = self._remember_schema(version, replies[-1])
            if schema is None:
                return {}
        codec = schema.codec
        items: dict[str, ItemRecord] = {}
        for item_id, raw in zip(item_ids, replies, strict=False):
            key = self.keys.item(version, item_id)
            value = self._checked(raw, key, "items")
            if not value:
                continue
            try:
                items[item_id] = decode_item(item_id, value, key, codec)
            except CorruptValueError as exc:
                self._corrupt("items", exc)
        return items

    def _decode_user(self, version: int, user_id: str, raw: object) -> UserRecord | None:
        key = self.keys.user(version, user_id)
        value = self._checked(raw, key, "user")
        if not value:
            return None
        try:
            return decode_user(user_id, value, key)
        except CorruptValueError as exc:
            self._corrupt("user", exc)
            return None

    def _remember_schema(self, version: int, raw: object) -> VersionSchema | None:
        """Cache the schema of a complete version; anything else reads as 'no data'."""
        key = self.keys.schema(version)
        value = self._checked(raw, key, "user")
        if not value:
            return None
        try:
            schema = VersionSchema.from_hash(value, key)
        except CorruptValueError as exc:
            self._corrupt("user", exc)
            return None
        if schema.state != "complete":
            return None
        self._schemas[version] = schema
        while len(self._schemas) > _SCHEMA_CACHE_SIZE:
            dropped, _ = self._schemas.popitem(last=False)
            self._through.pop(dropped, None)
        return schema

    def _checked(self, raw: object, key: str, stage: str) -> Mapping[bytes, bytes] | None:
        """A reply as a hash, or None when the key holds another type (corrupt).

        Any other error in the reply list (a cluster node down, LOADING, NOPERM...) is the
        store failing, not the value: it is raised and ends as FeatureStoreUnavailable.
        """
        if isinstance(raw, Exception):
            if not _wrong_type(raw):
                raise raw
            self._corrupt(stage, CorruptValueError(key, "*", f"{type(raw).__name__}: {raw}"))
            return None
        return raw  # type: ignore[return-value]

    def _parse_version(self, raw: object) -> int | None:
        if raw is None:
            return None
        if isinstance(raw, Exception) and not _wrong_type(raw):
            raise raw
        try:
            if isinstance(raw, Exception):
                raise ValueError(str(raw))
            version = int(raw)  # type: ignore[call-overload]
            if version < 1:
                raise ValueError(f"version {version} < 1")
        except ValueError as exc:
            self._corrupt("user", CorruptValueError(self.keys.alias, "*", str(exc)))
            return None
        return version

    def _corrupt(self, stage: str, exc: CorruptValueError) -> None:
        self._metrics.observe_error(stage, "corrupt")
        now = time.monotonic()
        last = self._logged.get(exc.key)
        if last is not None and now - last < _LOG_EVERY_S:
            return
        self._logged[exc.key] = now
        self._logged.move_to_end(exc.key)
        while len(self._logged) > 1024:
            self._logged.popitem(last=False)
        logger.warning(
            "corrupt feature value treated as missing: %s",
            exc,
            extra={"key": exc.key, "field": exc.field, "stage": stage},
        )


def _text_or(raw: bytes | None, default: str) -> str:
    return raw.decode() if raw else default


def _wrong_type(error: Exception) -> bool:
    """The one error a read gets from a bad value: the key holds another type."""
    return isinstance(error, redis.ResponseError) and str(error).startswith("WRONGTYPE")
