"""The events stream for offline jobs: export pages, consumer groups, the serving view of a user.

A consumer commits a batch with one server-side script: it acknowledges each entry (``XACK``),
counts only the entries whose acknowledgement took effect, and writes the batch's preference
refreshes, all atomically. So a worker killed at any point either committed a batch entirely
or not at all; on restart it first reads its own pending entries again (``XREADGROUP ... 0``),
then entries other consumers left idle (``XAUTOCLAIM``), then new ones. An entry is applied
exactly once, however often it is delivered. Like ingest, this needs a standalone Redis.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import redis

from feature_store.connection import SyncRedis, sync_client
from feature_store.live import ZERO_ID, Event, EventKeys, decode_entry, merge_history
from feature_store.schema import CorruptValueError, Keys, UserRecord, VersionSchema, decode_user

# KEYS: stream, counts hash, stats hash, then one user record key per refresh.
# ARGV[1]: group; ARGV[2]: JSON {"entries": [[id, user]...], "reset": [user...],
# "refresh": [[preference, watermark]...], "now": t, "ttl": s}.
# Returns the number of entries applied (acknowledged now, not before).
_COMMIT = """
local group = ARGV[1]
local p = cjson.decode(ARGV[2])
local reset = {}
for _, user in ipairs(p.reset) do reset[user] = true end
local applied = 0
for _, entry in ipairs(p.entries) do
  if redis.call('XACK', KEYS[1], group, entry[1]) == 1 then
    applied = applied + 1
    if not reset[entry[2]] then redis.call('HINCRBY', KEYS[2], entry[2], 1) end
  end
end
for _, user in ipairs(p.reset) do redis.call('HDEL', KEYS[2], user) end
for i, r in ipairs(p.refresh) do
  local key = KEYS[3 + i]
  redis.call('HSETNX', key, 'history', '[]')
  redis.call('HSET', key, 'preference', r[1], 'watermark', r[2], 'updated_at', p.now)
  if tonumber(p.ttl) > 0 then redis.call('EXPIRE', key, p.ttl) end
end
redis.call('HINCRBY', KEYS[3], 'applied', applied)
redis.call('HINCRBY', KEYS[3], 'refreshed', #p.refresh)
return applied
"""


@dataclass(frozen=True)
class Entry:
    """A delivered stream entry; ``event`` is None when retention trimmed it before delivery."""

    stream_id: str
    event: Event | None


@dataclass(frozen=True)
class Refresh:
    """A preference text to store for a user, and the history position it was written from."""

    user_id: str
    preference: str
    watermark: int


@dataclass(frozen=True)
class ServingUser:
    """What ``/recommend`` would read for a user now: the version and the joined record."""

    version: int | None
    user: UserRecord | None
    schema: VersionSchema | None = field(default=None, compare=False)


class EventLog:
    """Blocking access to the events side of one namespace (export, follow, operators)."""

    def __init__(self, url: str, namespace: str = "default", *, user_ttl_s: int = 30 * 24 * 3600):
        self.keys = Keys(namespace)
        self.events = EventKeys(namespace)
        self.user_ttl_s = user_ttl_s
        self._redis: SyncRedis = sync_client(url)
        self._commit = self._redis.register_script(_COMMIT)

    def close(self) -> None:
        self._redis.close()

    # ----- reading the stream --------------------------------------------------------------

    def length(self) -> int:
        return int(self._redis.xlen(self.events.stream))

    def last_id(self) -> str:
        """Id of the newest entry (``0-0`` when the stream is empty)."""
        newest = self._redis.xrevrange(self.events.stream, count=1)
        return newest[0][0].decode() if newest else ZERO_ID

    def entries(self, start: str = "-", end: str = "+", page: int = 1000) -> Iterator[Entry]:
        """Every entry from ``start`` to ``end`` (inclusive), oldest first, in pages."""
        low = start
        while True:
            rows = self._redis.xrange(self.events.stream, low, end, count=page)
            for stream_id, fields in rows:
                yield Entry(stream_id.decode(), decode_entry(fields))
            if len(rows) < page:
                return
            low = "(" + rows[-1][0].decode()

    def set_snapshot_watermark(self, manifest_id: str, stream_id: str) -> None:
        """Declare that the snapshot of ``manifest_id`` includes every entry up to ``stream_id``.

        Write it *before* publishing that manifest: readers cache it with the version.
        """
        if not manifest_id:
            raise ValueError("manifest_id must name the published run")
        self._redis.hset(self.events.through, manifest_id, stream_id)

    # ----- consumer groups -----------------------------------------------------------------

    def ensure_group(self, group: str, start: str = "0") -> None:
        """Create ``group`` (reading from ``start``: ``0`` = all retained, ``$`` = new only)."""
        try:
            self._redis.xgroup_create(self.events.stream, group, id=start, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def deliver(
        self, group: str, consumer: str, count: int, block_ms: int, claim_idle_ms: int
    ) -> list[Entry]:
        """The next entries for ``consumer``: its own pending first, then others' idle ones,
        then new ones (waiting up to ``block_ms``)."""
        stream = self.events.stream
        own = self._redis.xreadgroup(group, consumer, {stream: "0"}, count=count)
        entries = _entries(own)
        if entries:
            return entries
        claimed = self._redis.xautoclaim(stream, group, consumer, claim_idle_ms, count=count)
        entries = [_entry(stream_id, fields) for stream_id, fields in claimed[1]]
        if entries:
            return entries
        fresh = self._redis.xreadgroup(group, consumer, {stream: ">"}, count=count, block=block_ms)
        return _entries(fresh)

    def pending_counts(self, group: str, user_ids: Sequence[str]) -> dict[str, int]:
        """Events per user counted since that user's last refresh."""
        if not user_ids:
            return {}
        raw = self._redis.hmget(self.events.follow(group, "counts"), list(user_ids))
        return {user: int(value or 0) for user, value in zip(user_ids, raw, strict=True)}

    def commit(
        self, group: str, entries: Sequence[Entry], refreshes: Sequence[Refresh], version: int
    ) -> int:
        """Acknowledge ``entries`` and store ``refreshes`` on ``version`` in one atomic step.

        Users refreshed start counting from zero; returns how many entries were applied now.
        """
        payload = {
            "entries": [[e.stream_id, e.event.user_id if e.event else ""] for e in entries],
            "reset": [r.user_id for r in refreshes],
            "refresh": [[r.preference, str(r.watermark)] for r in refreshes],
            "now": repr(time.time()),
            "ttl": self.user_ttl_s,
        }
        keys = [
            self.events.stream,
            self.events.follow(group, "counts"),
            self.events.follow(group, "stats"),
            *(self.keys.user(version, r.user_id) for r in refreshes),
        ]
        return int(self._commit(keys=keys, args=[group, json.dumps(payload)]))

    def stats(self, group: str) -> dict[str, int]:
        """The group's totals: ``applied`` entries and ``refreshed`` preferences."""
        raw = self._redis.hgetall(self.events.follow(group, "stats"))
        return {k.decode(): int(v) for k, v in raw.items()}

    def lag(self, group: str) -> int:
        """Entries the group has not acknowledged yet: pending plus never delivered."""
        for info in self._redis.xinfo_groups(self.events.stream):
            name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
            if name != group:
                continue
            pending = int(info["pending"])
            undelivered = info.get("lag")
            if undelivered is None:  # Redis < 7 does not report it: count after last delivered
                last = info["last-delivered-id"]
                last = last.decode() if isinstance(last, bytes) else last
                undelivered = len(self._redis.xrange(self.events.stream, f"({last}", "+"))
            return pending + int(undelivered)
        return self.length()

    # ----- the serving view ----------------------------------------------------------------

    def serving_user(self, user_id: str) -> ServingUser:
        """The user as ``/recommend`` reads it: the current version's record joined with the
        live tail (``feature_store.live.merge_history``)."""
        raw = self._redis.get(self.keys.alias)
        if raw is None:
            return ServingUser(None, None)
        version = int(raw)
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.schema(version))
        pipe.hgetall(self.keys.user(version, user_id))
        pipe.lrange(self.events.tail(user_id), 0, -1)
        schema_raw, user_raw, tail = pipe.execute()
        if not schema_raw:
            return ServingUser(version, None)
        schema = VersionSchema.from_hash(schema_raw, self.keys.schema(version))
        through = self._redis.hget(self.events.through, schema.manifest_id)
        watermark = through.decode() if through else ZERO_ID
        key = self.keys.user(version, user_id)
        try:
            stored = decode_user(user_id, user_raw, key) if user_raw else None
        except CorruptValueError:
            stored = None
        past = stored.history if stored else ()
        history = merge_history(past, tail, watermark, schema.history_cap)
        if stored is None:
            user = UserRecord(user_id, history) if history else None
        else:
            user = UserRecord(user_id, history, stored.preference, stored.watermark)
        return ServingUser(version, user, schema)


def _entry(stream_id: bytes, fields: dict[bytes, bytes] | None) -> Entry:
    return Entry(stream_id.decode(), decode_entry(fields) if fields else None)


def _entries(reply: list) -> list[Entry]:
    """Entries of an XREADGROUP reply on one stream."""
    if not reply:
        return []
    _, rows = reply[0]
    return [_entry(stream_id, fields) for stream_id, fields in rows]
