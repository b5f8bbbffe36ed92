"""Bulk writes of one version's records: pipelined batches, a checkpoint after each, resumable.

Records are written in input order in batches of ``batch_size``; batch k+1 is built while Redis
executes batch k. The checkpoint (records done + last id) is written only after Redis
acknowledged the batch, so a publish that crashed resumes from its last checkpoint when the same
input comes again (``resume``). A resumed publish re-creates its first batch from scratch
(DEL + HSET): the crash may have left it half written. A progress bar shows keys written.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import TypeVar

from tqdm import tqdm

from feature_store.connection import SyncRedis
from feature_store.errors import FeatureStoreError
from feature_store.packed import ClusterPipeline, PackedPipeline, bulk_pipeline
from feature_store.schema import (
    EmbeddingCodec,
    ItemRecord,
    Keys,
    UserRecord,
    VersionSchema,
    encode_item,
    encode_user,
)

T = TypeVar("T")
Pipeline = PackedPipeline | ClusterPipeline


class BulkWriter:
    """Writes the users and items of one ``writing`` version, checkpointing as it goes."""

    def __init__(
        self,
        client: SyncRedis,
        keys: Keys,
        schema: VersionSchema,
        *,
        history_cap: int,
        user_ttl_s: int,
        batch_size: int,
        progress: bool,
        resumed: bool,
        keep_alive: Callable[[], None],
    ):
        """``keep_alive`` runs after every checkpoint: it renews the namespace lock."""
        self._redis, self.keys, self.schema = client, keys, schema
        self.history_cap, self.user_ttl_s = history_cap, user_ttl_s
        self.batch_size, self.progress, self.resumed = batch_size, progress, resumed
        self._keep_alive = keep_alive

    def users(self, users: Iterable[UserRecord]) -> VersionSchema:
        cap, ttl, version = self.history_cap, self.user_ttl_s, self.schema.version
        records = _resume(iter(users), self.schema.users, self.schema.last_user, "user", _user_id)

        def build(batch: list[UserRecord]) -> Pipeline:
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

        def build(batch: list[ItemRecord]) -> Pipeline:
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

    def _pipeline(self, keys: list[str]) -> Pipeline:
        pipe = bulk_pipeline(self._redis)
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
        self._redis.hset(self.keys.schema(schema.version), mapping=fields)
        self._keep_alive()


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
