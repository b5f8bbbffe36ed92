"""Versioned publishing: write a complete new version, then flip the alias with one SET.

Readers resolve the alias once per request and read only that version's keys, so they never
see a mix of two versions. A publish is identified by its ``manifest_id``: publishing the same
manifest again is a no-op (or re-activates it), and a publish that crashed resumes from its
last checkpoint (records are written in input order, so the same input must come again). One
operation per namespace at a time, enforced by a lock key with a TTL. After each publish only
the ``keep_versions`` most recently activated versions are kept.

Incremental user updates go to the serving version with one atomic server-side script, so the
online path can record new interactions and preference texts between publishes.
"""

from __future__ import annotations

import itertools
import json
import operator
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TypeVar

import redis
from tqdm import tqdm

from feature_store.connection import SyncRedis, sync_client
from feature_store.packed import ClusterPipeline, PackedPipeline, bulk_pipeline
from feature_store.schema import (
    EMBEDDING_DTYPES,
    CorruptValueError,
    EmbeddingCodec,
    ItemRecord,
    Keys,
    UserRecord,
    VersionSchema,
    encode_item,
    encode_user,
)

DEFAULT_USER_TTL_S = 30 * 24 * 3600  # users unseen for 30 days drop out of the store
DEFAULT_HISTORY_CAP = 200  # newest items kept in a user's stored history
HISTORY_LENGTH = 32  # activations remembered for rollback

T = TypeVar("T")

_REFRESH_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# Append items to a stored history (oldest first), keep the newest ARGV[1], set the optional
# preference/watermark, and refresh the TTL. cjson writes an empty array as {}, so an empty
# history is written as [] explicitly; the reader accepts both.
_UPDATE_USER = """
local history = {}
local raw = redis.call('HGET', KEYS[1], 'history')
if raw then
  local ok, decoded = pcall(cjson.decode, raw)
  if ok and type(decoded) == 'table' then history = decoded end
end
for _, item in ipairs(cjson.decode(ARGV[2])) do history[#history + 1] = item end
local cap = tonumber(ARGV[1])
local drop = #history - cap
if drop > 0 then
  local kept = {}
  for i = drop + 1, #history do kept[#kept + 1] = history[i] end
  history = kept
end
local encoded = '[]'
if #history > 0 then encoded = cjson.encode(history) end
redis.call('HSET', KEYS[1], 'history', encoded, 'updated_at', ARGV[6])
redis.call('HSETNX', KEYS[1], 'watermark', '0')
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'preference', ARGV[4]) end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'watermark', ARGV[5]) end
if tonumber(ARGV[7]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[7]) end
return #history
"""


class FeatureStoreError(RuntimeError):
    """An operation on the store cannot proceed; the message says why and what to do."""


@dataclass(frozen=True)
class NamespaceStatus:
    """What ``tandem features status`` shows."""

    namespace: str
    current: int | None
    history: list[int]
    versions: list[VersionSchema]
    used_memory_bytes: int
    bytes_per_item: float | None  # sampled with MEMORY USAGE on the serving version
    bytes_per_user: float | None


class FeatureWriter:
    """Offline writer and operator of one namespace (blocking redis-py; cluster or standalone)."""

    def __init__(
        self,
        url: str,
        namespace: str = "default",
        *,
        keep_versions: int = 2,
        user_ttl_s: int | None = DEFAULT_USER_TTL_S,
        history_cap: int = DEFAULT_HISTORY_CAP,
        cluster: bool = False,
        lock_ttl_s: float = 60.0,
    ):
        if keep_versions < 1:
            raise ValueError("keep_versions must be at least 1 (the serving version)")
        if history_cap < 1:
            raise ValueError("history_cap must be at least 1")
        self.keys = Keys(namespace)
        self.keep_versions = keep_versions
        self.user_ttl_s = user_ttl_s or 0
        self.history_cap = history_cap
        self.lock_ttl_ms = int(lock_ttl_s * 1000)
        self._redis: SyncRedis = sync_client(url, cluster=cluster)
        self._refresh = self._redis.register_script(_REFRESH_LOCK)
        self._release = self._redis.register_script(_RELEASE_LOCK)
        self._update_user = self._redis.register_script(_UPDATE_USER)

    def close(self) -> None:
        self._redis.close()

    # ----- reading the control keys -------------------------------------------------------

    def current_version(self) -> int | None:
        raw = self._redis.get(self.keys.alias)
        return None if raw is None else int(raw)

    def schema(self, version: int) -> VersionSchema | None:
        key = self.keys.schema(version)
        raw = self._redis.hgetall(key)
        return VersionSchema.from_hash(raw, key) if raw else None

    def versions(self) -> list[VersionSchema]:
        """Schemas of every registered version, oldest first (unreadable ones skipped)."""
        out = []
        for version in self._registered():
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

    # ----- publish ------------------------------------------------------------------------

    def publish(
        self,
        users: Iterable[UserRecord],
        items: Iterable[ItemRecord],
        *,
        manifest_id: str,
        embedding_dim: int | None,
        embedding_dtype: str = "float16",
        batch_size: int = 1000,
        progress: bool = True,
        resume: bool = True,
    ) -> int:
        """Write a complete version, flip the alias to it, drop old versions; returns it.

        Idempotent per ``manifest_id``: a complete version of the same manifest is re-activated
        instead of rewritten; an interrupted one is resumed (``resume=False`` starts over).
        """
        if not manifest_id:
            raise ValueError("manifest_id must name the run that produced these features")
        if embedding_dtype not in EMBEDDING_DTYPES:
            raise ValueError(f"embedding_dtype must be one of {sorted(EMBEDDING_DTYPES)}")
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        with self._locked(f"publish {manifest_id}") as token:
            self._repair_history()
            schema, resumed = self._claim(manifest_id, embedding_dim, embedding_dtype, resume)
            if schema.state != "complete":
                write = _BatchWriter(self, schema, batch_size, progress, token, resumed)
                schema = write.users(users)
                schema = write.items(items)
                schema = replace(schema, state="complete", completed_at=time.time())
                self._redis.hset(self.keys.schema(schema.version), mapping=schema.to_hash())
            self._activate(schema.version)
            self._drop_old_versions(token)
            return schema.version

    def _claim(
        self, manifest_id: str, dim: int | None, dtype: str, resume: bool
    ) -> tuple[VersionSchema, bool]:
        """The version to write and whether it is resumed: a matching one, or a new one."""
        wanted = (manifest_id, dim, dtype, self.history_cap)
        for schema in reversed(self.versions()):
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
            history_cap=self.history_cap,
        )
        self._redis.zadd(self.keys.versions, {str(version): version})
        self._redis.hset(self.keys.schema(version), mapping=schema.to_hash())
        return schema, False

    # ----- alias, history, rollback, cleanup ----------------------------------------------

    def _activate(self, version: int) -> None:
        """The atomic swap: one SET of the alias, then record it in the activation history."""
        self._redis.set(self.keys.alias, str(version))
        pipe = self._redis.pipeline(transaction=False)
        pipe.lrem(self.keys.history, 0, str(version))
        pipe.lpush(self.keys.history, str(version))
        pipe.ltrim(self.keys.history, 0, HISTORY_LENGTH - 1)
        pipe.execute()

    def _repair_history(self) -> None:
        """Make the history's head the alias again after a crash between the two writes."""
        current = self.current_version()
        if current is None:
            return
        history = self.history()
        if history and history[0] == current:
            return
        if current in history:
            self._redis.ltrim(self.keys.history, history.index(current), -1)
        else:
            self._redis.lpush(self.keys.history, str(current))

    def rollback(self) -> int:
        """Serve the previously activated version again; returns it."""
        with self._locked("rollback"):
            self._repair_history()
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

    def _drop_old_versions(self, token: str) -> None:
        keep = set(list(dict.fromkeys(self.history()))[: self.keep_versions])
        current = self.current_version()
        if current is not None:
            keep.add(current)
        for version in self._registered():
            if version not in keep:
                self._delete_version(version, token)

    def delete_version(self, version: int) -> int:
        """Delete every key of ``version`` (never the serving one); returns keys deleted."""
        with self._locked(f"delete v{version}") as token:
            if version == self.current_version():
                raise FeatureStoreError(f"v{version} is serving: roll back or publish first")
            return self._delete_version(version, token)

    def _delete_version(self, version: int, token: str) -> int:
        schema_key = self.keys.schema(version)
        if self._redis.exists(schema_key):
            self._redis.hset(schema_key, "state", "deleting")
        deleted = 0
        batch: list[bytes] = []
        for key in self._redis.scan_iter(match=self.keys.version_pattern(version), count=5000):
            if key.decode() == schema_key:
                continue
            batch.append(key)
            if len(batch) >= 2000:
                deleted += self._unlink(batch, token)
                batch = []
        deleted += self._unlink(batch, token)
        deleted += int(self._redis.delete(schema_key))
        self._redis.zrem(self.keys.versions, str(version))
        return deleted

    def _unlink(self, keys: list[bytes], token: str) -> int:
        if not keys:
            return 0
        if isinstance(self._redis, redis.RedisCluster):  # keys of many slots: one command each
            pipe = self._redis.pipeline(transaction=False)
            for key in keys:
                pipe.unlink(key)
            deleted = sum(int(n) for n in pipe.execute())
        else:
            deleted = int(self._redis.unlink(*keys))
        self._keep_lock(token)
        return deleted

    def _keep_lock(self, token: str) -> None:
        if not self._refresh(keys=[self.keys.lock], args=[token, self.lock_ttl_ms]):
            raise FeatureStoreError(
                f"lost the lock of namespace {self.keys.namespace!r} (it expired or was broken): "
                "another operation may have taken over; rerun to resume"
            )

    def _registered(self) -> list[int]:
        return [int(v) for v in self._redis.zrange(self.keys.versions, 0, -1)]

    # ----- incremental updates ------------------------------------------------------------

    def update_user(
        self,
        user_id: str,
        *,
        new_items: Sequence[str] = (),
        preference: str | None = None,
        watermark: int | None = None,
    ) -> None:
        """Append interactions (oldest first) and/or set the preference on the serving version.

        Atomic per user (one server-side script); creates the user if unknown. The next full
        publish replaces these records, so its input must include the same events.
        """
        if not user_id:
            raise ValueError("user id must be a non-empty string")
        if any(not isinstance(i, str) or not i for i in new_items):
            raise ValueError("new_items must be non-empty item id strings")
        version = self.current_version()
        if version is None:
            raise FeatureStoreError(
                f"nothing published in namespace {self.keys.namespace!r}: "
                "run `tandem features publish` first"
            )
        schema = self.schema(version)
        cap = schema.history_cap if schema is not None else self.history_cap
        self._update_user(
            keys=[self.keys.user(version, user_id)],
            args=[
                cap,
                json.dumps(list(new_items)),
                "1" if preference is not None else "0",
                preference or "",
                "" if watermark is None else str(int(watermark)),
                repr(time.time()),
                self.user_ttl_s,
            ],
        )

    # ----- status and locking -------------------------------------------------------------

    def status(self, sample: int = 200) -> NamespaceStatus:
        current = self.current_version()
        memory = self._redis.info("memory")
        if "used_memory" not in memory:  # cluster: one dict per node
            used = sum(int(node["used_memory"]) for node in memory.values())
        else:
            used = int(memory["used_memory"])
        per_item = per_user = None
        if current is not None:
            per_item = self._sampled_bytes(f"{self.keys.prefix}v{current}:item:*", sample)
            per_user = self._sampled_bytes(f"{self.keys.prefix}v{current}:user:*", sample)
        return NamespaceStatus(
            namespace=self.keys.namespace,
            current=current,
            history=self.history(),
            versions=self.versions(),
            used_memory_bytes=used,
            bytes_per_item=per_item,
            bytes_per_user=per_user,
        )

    def _sampled_bytes(self, pattern: str, sample: int) -> float | None:
        keys = list(itertools.islice(self._redis.scan_iter(match=pattern, count=1000), sample))
        sizes = [self._redis.memory_usage(key) or 0 for key in keys]
        return sum(sizes) / len(sizes) if sizes else None

    @contextmanager
    def _locked(self, operation: str) -> Iterator[str]:
        token = f"{operation} pid={os.getpid()} {uuid.uuid4().hex}"
        if not self._redis.set(self.keys.lock, token, nx=True, px=self.lock_ttl_ms):
            holder = self._redis.get(self.keys.lock)
            ttl = self._redis.pttl(self.keys.lock)
            raise FeatureStoreError(
                f"namespace {self.keys.namespace!r} is busy: {holder!r} holds its lock for "
                f"{max(ttl, 0) / 1000:.0f} s more (it expires by itself if that process died)"
            )
        try:
            yield token
        finally:
            self._release(keys=[self.keys.lock], args=[token])


class _BatchWriter:
    """Writes one version's records in pipelined batches with a checkpoint after each batch.

    The checkpoint (records done + last id) is written only after Redis acknowledged the batch.
    A resumed publish re-creates its first batch from scratch (DEL + HSET): the crash may have
    left it half written.
    """

    def __init__(
        self,
        writer: FeatureWriter,
        schema: VersionSchema,
        batch_size: int,
        progress: bool,
        token: str,
        resumed: bool,
    ):
        self.writer, self.schema, self.token = writer, schema, token
        self.batch_size, self.progress, self.resumed = batch_size, progress, resumed
        self.keys = writer.keys

    def users(self, users: Iterable[UserRecord]) -> VersionSchema:
        cap, ttl, version = self.writer.history_cap, self.writer.user_ttl_s, self.schema.version
        records = _resume(iter(users), self.schema.users, self.schema.last_user, "user", _user_id)

        def build(batch: list[UserRecord]) -> PackedPipeline | ClusterPipeline:
            keys = [self.keys.user(version, user.user_id) for user in batch]
            pipe = self._pipeline(keys)
            for key, user in zip(keys, batch, strict=True):
                pipe.command("HSET", key, *_flat(encode_user(user, cap)))
                if ttl:
                    pipe.command("EXPIRE", key, ttl)
            return pipe

        def advance(schema: VersionSchema, batch: list[UserRecord]) -> VersionSchema:
            return replace(schema, users=schema.users + len(batch), last_user=batch[-1].user_id)

        with self._bar("users", users, self.schema.users) as bar:
            self._write(_batches(records, self.batch_size), build, advance, bar)
        return self.schema

    def items(self, items: Iterable[ItemRecord]) -> VersionSchema:
        codec, version = self.schema.codec, self.schema.version
        records = _resume(iter(items), self.schema.items, self.schema.last_item, "item", _item_id)

        def build(batch: list[ItemRecord]) -> PackedPipeline | ClusterPipeline:
            keys = [self.keys.item(version, item.item_id) for item in batch]
            pipe = self._pipeline(keys)
            vectors = _encoded_embeddings(batch, codec)
            for key, item in zip(keys, batch, strict=True):
                fields = encode_item(item, codec, vectors.get(item.item_id))
                pipe.command("HSET", key, *_flat(fields))
            return pipe

        def advance(schema: VersionSchema, batch: list[ItemRecord]) -> VersionSchema:
            return replace(schema, items=schema.items + len(batch), last_item=batch[-1].item_id)

        with self._bar("items", items, self.schema.items) as bar:
            self._write(_batches(records, self.batch_size), build, advance, bar)
        return self.schema

    def _write(self, batches, build, advance, bar: tqdm) -> None:  # type: ignore[no-untyped-def]
        """Build batch k+1 while Redis executes batch k; checkpoint k once its replies are in."""
        in_flight = None
        try:
            for batch in batches:
                pipe = build(batch)
                if in_flight is not None:
                    self._settle(*in_flight, advance, bar)
                    in_flight = None
                pipe.send()
                in_flight = (pipe, batch)
            if in_flight is not None:
                self._settle(*in_flight, advance, bar)
                in_flight = None
        finally:
            if in_flight is not None:
                in_flight[0].close()

    def _settle(self, pipe, batch, advance, bar: tqdm) -> None:  # type: ignore[no-untyped-def]
        pipe.wait()
        self._checkpoint(advance(self.schema, batch))
        bar.update(len(batch))

    def _pipeline(self, keys: list[str]) -> PackedPipeline | ClusterPipeline:
        pipe = bulk_pipeline(self.writer._redis)
        if self.resumed:
            for key in keys:
                pipe.command("DEL", key)
            self.resumed = False
        return pipe

    def _bar(self, what: str, records: Iterable[object], initial: int) -> tqdm:
        return tqdm(
            total=_total(records),
            initial=initial,
            desc=f"v{self.schema.version} {what}",
            unit="key",
            disable=not self.progress,
        )

    def _checkpoint(self, schema: VersionSchema) -> None:
        """Record progress after the batch is acknowledged, and keep the lock alive."""
        self.schema = schema
        fields = {
            "users": str(schema.users),
            "last_user": schema.last_user,
            "items": str(schema.items),
            "last_item": schema.last_item,
        }
        self.writer._redis.hset(self.keys.schema(schema.version), mapping=fields)
        self.writer._keep_lock(self.token)


def _encoded_embeddings(batch: list[ItemRecord], codec: EmbeddingCodec | None) -> dict[str, bytes]:
    """The batch's embeddings encoded in one numpy pass, by item id."""
    if codec is None:
        return {}
    with_vectors = [item for item in batch if item.embedding is not None]
    encoded = codec.encode_many(
        [item.embedding for item in with_vectors], [item.item_id for item in with_vectors]
    )
    return {item.item_id: raw for item, raw in zip(with_vectors, encoded, strict=True)}


def _flat(fields: dict[str, str | bytes]) -> list[str | bytes]:
    return [part for pair in fields.items() for part in pair]


def _user_id(user: UserRecord) -> str:
    return user.user_id


def _item_id(item: ItemRecord) -> str:
    return item.item_id


def _resume(records: Iterator[T], done: int, last_id: str, kind: str, id_of) -> Iterator[T]:  # type: ignore[no-untyped-def]
    """Skip the ``done`` records a previous attempt wrote, checking it was the same input."""
    if done:
        skipped = list(itertools.islice(records, done - 1))
        marker = next(records, None)
        if len(skipped) != done - 1 or marker is None or id_of(marker) != last_id:
            raise FeatureStoreError(
                f"cannot resume: the input differs from the interrupted publish (its {kind} "
                f"#{done} was {last_id!r}); publish with resume disabled to start over"
            )
    return records


def _batches(records: Iterator[T], size: int) -> Iterator[list[T]]:
    while batch := list(itertools.islice(records, size)):
        yield batch


def _total(records: Iterable[object]) -> int | None:
    hint = operator.length_hint(records, -1)
    return hint if hint >= 0 else None
