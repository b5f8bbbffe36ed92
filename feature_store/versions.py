"""The control keys of one namespace: registered versions, their schemas, the alias, history.

Readers resolve the alias once per request and read only that version's keys, so they never see
a mix of two versions. ``activate`` is the atomic swap (one SET of the alias), then records the
version at the head of the activation history, which rollback walks back. A crash between the
two writes is repaired at the start of the next operation (``repair_history``). Only versions in
the newest ``keep_versions`` activations (and the serving one) survive ``drop_old``.

Callers hold the namespace lock around every change; long deletions call ``keep_alive`` between
batches so the lock does not expire under them.
"""

from __future__ import annotations

from collections.abc import Callable

import redis

from feature_store.connection import SyncRedis
from feature_store.errors import FeatureStoreError
from feature_store.schema import CorruptValueError, Keys, VersionSchema

HISTORY_LENGTH = 32  # activations remembered for rollback
DELETE_BATCH = 2000  # keys unlinked per command while dropping a version

KeepAlive = Callable[[], None]


class VersionRegistry:
    """Reads and changes the control keys of one namespace (blocking redis-py)."""

    def __init__(self, client: SyncRedis, keys: Keys):
        self._redis = client
        self.keys = keys

    # ----- reading ------------------------------------------------------------------------

    def current(self) -> int | None:
        raw = self._redis.get(self.keys.alias)
        return None if raw is None else int(raw)

    def schema(self, version: int) -> VersionSchema | None:
        key = self.keys.schema(version)
        raw = self._redis.hgetall(key)
        return VersionSchema.from_hash(raw, key) if raw else None

    def schemas(self) -> list[VersionSchema]:
        """Schemas of every registered version, oldest first (unreadable ones skipped)."""
        out = []
        for version in self.registered():
            try:
                schema = self.schema(version)
            except CorruptValueError:
                continue
            if schema is not None:
                out.append(schema)
        return out

    def history(self) -> list[int]:
        """Activated versions, newest first (the head is the serving version)."""
        return [int(v) for v in self._redis.lrange(self.keys.history, 0, -1)]

    def registered(self) -> list[int]:
        return [int(v) for v in self._redis.zrange(self.keys.versions, 0, -1)]

    # ----- writing ------------------------------------------------------------------------

    def save(self, schema: VersionSchema) -> None:
        self._redis.hset(self.keys.schema(schema.version), mapping=schema.to_hash())

    def claim(
        self, manifest_id: str, dim: int | None, dtype: str, history_cap: int, resume: bool
    ) -> tuple[VersionSchema, bool]:
        """The version to write and whether it is resumed: a matching one, or a new one."""
        wanted = (manifest_id, dim, dtype, history_cap)
        for schema in reversed(self.schemas()):
            found = (schema.manifest_id, schema.embedding_dim, schema.embedding_dtype)
            if (*found, schema.history_cap) != wanted:
                continue
            if schema.state == "complete":
                return schema, False
            if schema.state == "writing" and resume:
                return schema, True
        version = int(self._redis.incr(self.keys.counter))
        schema = VersionSchema(
            version=version,
            manifest_id=manifest_id,
            embedding_dim=dim,
            embedding_dtype=dtype,
            history_cap=history_cap,
        )
        self._redis.zadd(self.keys.versions, {str(version): version})
        self.save(schema)
        return schema, False

    def activate(self, version: int) -> None:
        """The atomic swap: one SET of the alias, then record it in the activation history."""
        self._redis.set(self.keys.alias, str(version))
        pipe = self._redis.pipeline(transaction=False)
        pipe.lrem(self.keys.history, 0, str(version))
        pipe.lpush(self.keys.history, str(version))
        pipe.ltrim(self.keys.history, 0, HISTORY_LENGTH - 1)
        pipe.execute()

    def repair_history(self) -> None:
        """Make the history's head the alias again after a crash between the two writes."""
        current = self.current()
        if current is None:
            return
        history = self.history()
        if history and history[0] == current:
            return
        if current in history:
            self._redis.ltrim(self.keys.history, history.index(current), -1)
        else:
            self._redis.lpush(self.keys.history, str(current))

    def roll_back(self) -> int:
        """Serve the previously activated complete version again; returns it."""
        self.repair_history()
        history = self.history()
        if not history:
            raise FeatureStoreError(
                f"nothing published in namespace {self.keys.namespace!r}: nothing to roll back"
            )
        for position, version in enumerate(history[1:], start=1):
            schema = self.schema(version)
            if schema is not None and schema.state == "complete" and version != history[0]:
                self._redis.set(self.keys.alias, str(version))
                self._redis.ltrim(self.keys.history, position, -1)
                return version
        raise FeatureStoreError(
            f"no previous version of namespace {self.keys.namespace!r} to roll back to "
            f"(serving v{history[0]}; older versions were not kept or never existed)"
        )

    def drop_old(self, keep_versions: int, keep_alive: KeepAlive) -> None:
        """Delete every version outside the newest ``keep_versions`` activations."""
        keep = set(list(dict.fromkeys(self.history()))[:keep_versions])
        current = self.current()
        if current is not None:
            keep.add(current)
        for version in self.registered():
            if version not in keep:
                self.delete(version, keep_alive)

    def delete(self, version: int, keep_alive: KeepAlive) -> int:
        """Delete every key of ``version``; returns how many. Marked ``deleting`` first."""
        schema_key = self.keys.schema(version)
        if self._redis.exists(schema_key):
            self._redis.hset(schema_key, "state", "deleting")
        deleted = 0
        batch: list[bytes] = []
        for key in self._redis.scan_iter(match=self.keys.version_pattern(version), count=5000):
            if key.decode() == schema_key:
                continue
            batch.append(key)
            if len(batch) >= DELETE_BATCH:
                deleted += self._unlink(batch, keep_alive)
                batch = []
        deleted += self._unlink(batch, keep_alive)
        deleted += int(self._redis.delete(schema_key))
        self._redis.zrem(self.keys.versions, str(version))
        return deleted

    def _unlink(self, keys: list[bytes], keep_alive: KeepAlive) -> int:
        if not keys:
            return 0
        if isinstance(self._redis, redis.RedisCluster):  # keys of many slots: one command each
            pipe = self._redis.pipeline(transaction=False)
            for key in keys:
                pipe.unlink(key)
            deleted = sum(int(n) for n in pipe.execute())
        else:
            deleted = int(self._redis.unlink(*keys))
        keep_alive()
        return deleted
