"""Versioned publishing and operations on one namespace: publish, rollback, delete, update, status.

A publish writes a complete new version (``bulk``), then flips the alias with one SET
(``versions``), so readers never see a mix of two versions. A publish is identified by its
``manifest_id``: publishing the same manifest again is a no-op (or re-activates it), and a
publish that crashed resumes from its last checkpoint (records are written in input order, so
the same input must come again). After each publish only the ``keep_versions`` most recently
activated versions are kept. Incremental user updates go to the serving version (``updates``).

One operation per namespace at a time: redis-py's ``Lock`` on the namespace's lock key, with a
TTL renewed after every batch, so the lock of a process that died expires by itself. The lock's
token names the operation and process, so a second operator is told who holds it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

from redis.exceptions import LockError

from feature_store.bulk import BulkWriter
from feature_store.connection import SyncRedis, sync_client
from feature_store.errors import FeatureStoreError
from feature_store.schema import EMBEDDING_DTYPES, ItemRecord, Keys, UserRecord, VersionSchema
from feature_store.updates import UserUpdates
from feature_store.versions import KeepAlive, VersionRegistry

DEFAULT_USER_TTL_S = 30 * 24 * 3600  # users unseen for 30 days drop out of the store
DEFAULT_HISTORY_CAP = 200  # newest items kept in a user's stored history


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
        self.lock_ttl_s = lock_ttl_s
        self._redis: SyncRedis = sync_client(url, cluster=cluster)
        self._versions = VersionRegistry(self._redis, self.keys)
        self._updates = UserUpdates(
            self._redis, self._versions, history_cap=history_cap, user_ttl_s=self.user_ttl_s
        )

    def close(self) -> None:
        self._redis.close()

    # ----- reading the control keys -------------------------------------------------------

    def current_version(self) -> int | None:
        return self._versions.current()

    def schema(self, version: int) -> VersionSchema | None:
        return self._versions.schema(version)

    def versions(self) -> list[VersionSchema]:
        """Schemas of every registered version, oldest first (unreadable ones skipped)."""
        return self._versions.schemas()

    def history(self) -> list[int]:
        """Activated versions, newest first (the head is the serving version)."""
        return self._versions.history()

    # ----- operations ---------------------------------------------------------------------

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
        with self._locked(f"publish {manifest_id}") as keep_alive:
            self._versions.repair_history()
            schema, resumed = self._versions.claim(
                manifest_id, embedding_dim, embedding_dtype, self.history_cap, resume
            )
            if schema.state != "complete":
                write = BulkWriter(
                    self._redis,
                    self.keys,
                    schema,
                    history_cap=self.history_cap,
                    user_ttl_s=self.user_ttl_s,
                    batch_size=batch_size,
                    progress=progress,
                    resumed=resumed,
                    keep_alive=keep_alive,
                )
                write.users(users)
                schema = write.items(items)
                self._versions.save(replace(schema, state="complete", completed_at=time.time()))
            self._versions.activate(schema.version)
            self._versions.drop_old(self.keep_versions, keep_alive)
            return schema.version

    def rollback(self) -> int:
        """Serve the previously activated version again; returns it."""
        with self._locked("rollback"):
            return self._versions.roll_back()

    def delete_version(self, version: int) -> int:
        """Delete every key of ``version`` (never the serving one); returns keys deleted."""
        with self._locked(f"delete v{version}") as keep_alive:
            if version == self.current_version():
                raise FeatureStoreError(f"v{version} is serving: roll back or publish first")
            return self._versions.delete(version, keep_alive)

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
        self._updates.update_user(
            user_id, new_items=new_items, preference=preference, watermark=watermark
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
    def _locked(self, operation: str) -> Iterator[KeepAlive]:
        """Hold the namespace lock; yields ``keep_alive``, which renews its TTL or raises."""
        lock = self._redis.lock(
            self.keys.lock, timeout=self.lock_ttl_s, blocking=False, thread_local=False
        )
        if not lock.acquire(token=f"{operation} pid={os.getpid()} {uuid.uuid4().hex}"):
            holder = self._redis.get(self.keys.lock)
            ttl = self._redis.pttl(self.keys.lock)
            raise FeatureStoreError(
                f"namespace {self.keys.namespace!r} is busy: {holder!r} holds its lock for "
                f"{max(ttl, 0) / 1000:.0f} s more (it expires by itself if that process died)"
            )

        def keep_alive() -> None:
            try:
                lock.reacquire()
            except LockError:
                raise FeatureStoreError(
                    f"lost the lock of namespace {self.keys.namespace!r} (it expired or was "
                    "broken): another operation may have taken over; rerun to resume"
                ) from None

        try:
            yield keep_alive
        finally:
            with contextlib.suppress(LockError):  # expired or taken over: nothing to release
                lock.release()
