"""The traffic split between ranker variants: who gets which variant, versioned in Redis.

A split names the variants, their traffic shares, which one is the control and which are
shadows (scored off the response path, never served), plus the salt of the assignment hash.
Assignment is stable: blake2b(salt, user id) -> a uniform number in [0, 1) -> the variant whose
cumulative share interval holds it, so a user keeps their variant until the shares or the salt
change, and a new salt reshuffles everyone.

Every gateway must serve the same split and follow a promote or rollback without a restart, so
the active split lives in Redis under one key per namespace, ``tandem:{ns}:variants``: a JSON
document ``{"active": Split, "history": [Split, ...]}``. One key means every change is a single
atomic write (WATCH/MULTI) and a gateway's poll is one GET.
Versions only go up: rollback re-activates the previous split under a new version, so a gateway
that compares versions never misses a change.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Annotated

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from feature_store.connection import SyncRedis, sync_client
from feature_store.schema import Keys

NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,31}$"  # also a Prometheus label value: keep it short
SHARE_TOLERANCE = 1e-6
HISTORY_LENGTH = 16  # previous splits kept for rollback
_UNIT = float(2**64)

VariantName = Annotated[str, Field(pattern=NAME_PATTERN)]


class SplitError(ValueError):
    """A split that cannot be used or a change that cannot be made; the message says why."""


class SplitVariant(BaseModel):
    """One variant's place in the split (its ranker configuration lives in the gateway's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: VariantName
    share: float = Field(0.0, ge=0.0, le=1.0)
    shadow: bool = False  # scored off the response path on the served candidates, never served
    adapter: str | None = None  # the vLLM adapter it scores with, if any (promote checks it)

    @model_validator(mode="after")
    def _shadow_is_not_served(self) -> SplitVariant:
        if self.shadow and self.share > 0:
            raise ValueError(f"variant {self.name!r} is a shadow: its share must be 0")
        return self


class Split(BaseModel):
    """The active assignment of users to variants; ``version`` 0 = not yet stored in Redis."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(0, ge=0)
    salt: str = Field(min_length=1, max_length=64)
    control: VariantName
    variants: tuple[SplitVariant, ...] = Field(min_length=1)
    source: str = ""  # fingerprint of the configured split this one descends from
    reason: str = ""  # why it became active: configured, promote NAME, rollback to vN
    activated_at: float = 0.0  # epoch seconds

    @model_validator(mode="after")
    def _check(self) -> Split:
        names = [v.name for v in self.variants]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"variant names must be unique; repeated: {duplicates}")
        if self.control not in names:
            raise ValueError(f"the control {self.control!r} is not one of the variants {names}")
        if self.variant(self.control).shadow:
            raise ValueError(f"the control {self.control!r} cannot be a shadow")
        total = sum(v.share for v in self.variants)
        if abs(total - 1.0) > SHARE_TOLERANCE:
            raise ValueError(f"the served shares must sum to 1, not {total:.6g} ({names})")
        return self

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.variants]

    @property
    def shadows(self) -> list[str]:
        return [v.name for v in self.variants if v.shadow]

    def variant(self, name: str) -> SplitVariant:
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise SplitError(f"no variant {name!r} in the split (variants: {self.names})")

    def assign(self, user_id: str) -> str:
        """The variant that serves ``user_id``: stable for a given salt and shares."""
        point = unit_interval(user_id, self.salt)
        cumulative, last = 0.0, self.control
        for variant in self.variants:
            if variant.share <= 0:
                continue
            cumulative += variant.share
            last = variant.name
            if point < cumulative:
                return variant.name
        return last  # shares sum to 1 within SHARE_TOLERANCE: rounding lands on the last one

    def fingerprint(self) -> str:
        """What the split says (not its version or history), to tell a changed configuration."""
        body = {
            "salt": self.salt,
            "control": self.control,
            "variants": self.model_dump()["variants"],
        }
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]

    def promoted(self, name: str) -> Split:
        """``name`` becomes the control at 100% of traffic; the others stay listed at share 0
        (so a rollback and a later promote can bring them back)."""
        self.variant(name)  # raises for an unknown name
        variants = tuple(
            v.model_copy(update={"share": 1.0 if v.name == name else 0.0, "shadow": False})
            if v.name == name or not v.shadow
            else v
            for v in self.variants
        )
        return self.model_copy(
            update={"control": name, "variants": variants, "reason": f"promote {name}"}
        )


def unit_interval(user_id: str, salt: str) -> float:
    """A uniform number in [0, 1) from (salt, user id); ids are printable, so NUL separates."""
    digest = hashlib.blake2b(f"{salt}\0{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _UNIT


class SplitDocument(BaseModel):
    """What the Redis key holds: the active split and the ones before it, newest first."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    active: Split
    history: tuple[Split, ...] = ()


def parse_document(raw: bytes | str, key: str) -> SplitDocument:
    try:
        return SplitDocument.model_validate_json(raw)
    except ValidationError as exc:
        raise SplitError(f"{key} does not hold a valid split: {exc}") from None


class SplitStore:
    """Reads and changes the stored split of one namespace (blocking: CLI and start-up)."""

    def __init__(self, client: SyncRedis, namespace: str):
        self._redis = client
        self.key = Keys(namespace).variants

    @classmethod
    def connect(cls, url: str, namespace: str, *, timeout_s: float = 1.0) -> SplitStore:
        """A store on its own client; short timeouts, so a hung Redis cannot stall a poll."""
        return cls(sync_client(url, socket_timeout=timeout_s, connect_timeout=timeout_s), namespace)

    @property
    def client(self) -> SyncRedis:
        """The store's connection, for other reads of the same namespace (attribution)."""
        return self._redis

    def close(self) -> None:
        self._redis.close()

    def read(self) -> SplitDocument | None:
        raw = self._redis.get(self.key)
        return None if raw is None else parse_document(raw, self.key)

    def ensure(self, configured: Split) -> tuple[Split, bool]:
        """The split to serve at start-up: the stored one when it descends from this
        configuration (a restart never undoes a promote), else ``configured`` as a new version
        (the configuration changed). Returns (active split, whether this call stored it)."""
        source = configured.fingerprint()
        stored: list[bool] = []

        def change(doc: SplitDocument | None) -> SplitDocument | None:
            stored.clear()
            if doc is not None and doc.active.source == source:
                return None
            stored.append(True)
            new = configured.model_copy(update={"source": source, "reason": "configured"})
            return _activated(doc, new)

        doc = self._change(change)
        return doc.active, bool(stored)

    def promote(self, name: str) -> Split:
        def change(doc: SplitDocument | None) -> SplitDocument:
            if doc is None:
                raise SplitError(f"no split stored at {self.key}: start a gateway with variants")
            if doc.active.control == name and doc.active.variant(name).share == 1.0:
                raise SplitError(f"{name!r} already serves 100% of traffic as the control")
            return _activated(doc, doc.active.promoted(name))

        return self._change(change).active

    def activate(self, split: Split, reason: str) -> Split:
        """Serve ``split`` as the next version (e.g. new shares for the same variants); it keeps
        the stored split's configuration fingerprint, so a gateway restart does not undo it."""

        def change(doc: SplitDocument | None) -> SplitDocument:
            if doc is None:
                raise SplitError(f"no split stored at {self.key}: start a gateway with variants")
            new = split.model_copy(update={"source": doc.active.source, "reason": reason})
            return _activated(doc, new)

        return self._change(change).active

    def rollback(self) -> Split:
        """Re-activate the previous split (as a new version); the current one is dropped."""

        def change(doc: SplitDocument | None) -> SplitDocument:
            if doc is None or not doc.history:
                raise SplitError(f"nothing to roll back to: {self.key} has no previous split")
            previous, *older = doc.history
            reason = f"rollback to v{previous.version}"
            new = previous.model_copy(update=_stamp(doc.active.version + 1, reason))
            return SplitDocument(active=new, history=tuple(older))

        return self._change(change).active

    def _change(
        self, change: Callable[[SplitDocument | None], SplitDocument | None]
    ) -> SplitDocument:
        """Apply ``change`` to the stored document atomically (retried if another writer won)."""
        while True:
            with self._redis.pipeline() as pipe:
                try:
                    pipe.watch(self.key)
                    raw = pipe.get(self.key)
                    doc = None if raw is None else parse_document(raw, self.key)
                    new = change(doc)
                    if new is None:
                        assert doc is not None
                        return doc
                    pipe.multi()
                    pipe.set(self.key, new.model_dump_json())
                    pipe.execute()
                    return new
                except redis.WatchError:
                    continue


def _stamp(version: int, reason: str) -> dict:
    return {"version": version, "reason": reason, "activated_at": time.time()}


def _activated(doc: SplitDocument | None, new: Split) -> SplitDocument:
    """``new`` active as the next version; the current split goes to the head of the history."""
    if doc is None:
        return SplitDocument(active=new.model_copy(update=_stamp(1, new.reason)))
    history = (doc.active, *doc.history)[:HISTORY_LENGTH]
    return SplitDocument(
        active=new.model_copy(update=_stamp(doc.active.version + 1, new.reason)), history=history
    )
