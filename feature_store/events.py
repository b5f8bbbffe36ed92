"""Ingesting live events: one server-side script per batch, so nothing is ever half-applied.

For each event the script checks the idempotency record (``SET NX``, kept ``dedup_ttl_s``),
appends the event to the stream (``XADD MAXLEN ~ stream_max``) and to the user's live tail
(capped, with a TTL), and counts a click for the ranker variant whose answer the event names
(``feature_store.attribution``). A batch is one ``EVALSHA``: Redis runs it atomically, and with
``appendonly`` the whole script is persisted as one unit, so a crash or a lost connection
leaves every event either fully recorded or not at all. A client that retries after a lost
reply sends the same event ids again; they are then duplicates, never applied twice. Each call
carries a random token stored in the idempotency record, so a transparent retry of the *same*
call (redis-py reconnecting) still reports its events as accepted.

All keys of a batch are declared to the script; they live in different cluster slots, so this
path needs a standalone Redis (or a primary with replicas), not Redis Cluster.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from feature_store.attribution import ATTRIBUTE_LUA, AttributionKeys
from feature_store.client import within_deadline
from feature_store.connection import async_client
from feature_store.live import (
    DEFAULT_DEDUP_TTL_S,
    DEFAULT_STREAM_MAX,
    DEFAULT_TAIL_CAP,
    DEFAULT_TAIL_TTL_S,
    Event,
    EventKeys,
)

# KEYS: stream, attribution counters, then (dedup, tail, answer) per event. ARGV: token, stream
# max, dedup ttl, tail cap, tail ttl, then each event's values in live.STREAM_FIELDS order
# (``names`` below). Returns one code per event ('a' accepted, 'd' duplicate), then the stream
# length and the number of new attributed clicks (feature_store.attribution).
_INGEST = (
    """
if redis.replicate_commands then redis.replicate_commands() end
local token, maxlen, dedup_ttl = ARGV[1], ARGV[2], ARGV[3]
local cap, tail_ttl = tonumber(ARGV[4]), ARGV[5]
local stats = KEYS[2]
local names = {'event_id', 'user_id', 'item_id', 'type', 'ts', 'request_id'}
local width = #names
local out = {}
local here = {}  -- event ids met in this run: a repeat inside one batch is a duplicate
local attributed = 0
local n = (#KEYS - 2) / 3
for i = 1, n do
  local dedup, tail, answer = KEYS[3 * i], KEYS[3 * i + 1], KEYS[3 * i + 2]
  local base = 5 + (i - 1) * width
  local user_id, item_id = ARGV[base + 2], ARGV[base + 3]
  local seen = redis.call('GET', dedup)
  if here[dedup] then
    out[i] = 'd'
  elseif seen then
    here[dedup] = true
    if string.sub(seen, 1, #token + 1) == token .. ' ' then out[i] = 'a' else out[i] = 'd' end
  else
    here[dedup] = true
    local fields = {}
    for f = 1, width do
      fields[#fields + 1] = names[f]
      fields[#fields + 1] = ARGV[base + f]
    end
    local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', unpack(fields))
    redis.call('SET', dedup, token .. ' ' .. id, 'EX', dedup_ttl)
    redis.call('RPUSH', tail, id .. '\\t' .. item_id)
    redis.call('LTRIM', tail, -cap, -1)
    redis.call('EXPIRE', tail, tail_ttl)
"""
    + ATTRIBUTE_LUA
    + """
    out[i] = 'a'
  end
end
out[n + 1] = redis.call('XLEN', KEYS[1])
out[n + 2] = attributed
return out
"""
)


@dataclass(frozen=True)
class Ingested:
    """Per event (in input order) whether it was new, and the stream length after the batch."""

    accepted: list[bool]
    stream_length: int
    attributed: int = 0  # new clicks attributed to a served answer (feature_store.attribution)


class EventStore:
    """Async writer of live events for one namespace; share one per process, ``close()`` it."""

    def __init__(
        self,
        url: str,
        namespace: str = "default",
        *,
        deadline: float = 1.0,
        stream_max: int = DEFAULT_STREAM_MAX,
        dedup_ttl_s: int = DEFAULT_DEDUP_TTL_S,
        tail_cap: int = DEFAULT_TAIL_CAP,
        tail_ttl_s: int = DEFAULT_TAIL_TTL_S,
        max_connections: int = 32,
    ):
        if dedup_ttl_s < 24 * 3600:
            raise ValueError("dedup_ttl_s must be at least 24 h (the idempotency contract)")
        self.keys = EventKeys(namespace)
        self.attribution = AttributionKeys(namespace)
        self.deadline = deadline
        self._options = (stream_max, dedup_ttl_s, tail_cap, tail_ttl_s)
        self._redis = async_client(
            url,
            socket_timeout=deadline / 2,
            connect_timeout=deadline / 2,
            max_connections=max_connections,
            pool_timeout=deadline,
        )
        self._ingest = self._redis.register_script(_INGEST)

    async def ingest(self, events: Sequence[Event]) -> Ingested:
        """Record ``events`` atomically; FeatureStoreUnavailable when Redis does not answer."""
        if not events:
            return Ingested([], await self.stream_length())
        keys = [self.keys.stream, self.attribution.stats]
        args: list[str | int] = [uuid.uuid4().hex, *self._options]
        for event in events:
            keys += [self.keys.dedup(event.event_id), self.keys.tail(event.user_id)]
            keys.append(self.attribution.answer(event.request_id))
            args += event.fields()
        reply = await within_deadline(
            self._ingest(keys=keys, args=args), self.deadline, "event store"
        )
        codes = [code.decode() if isinstance(code, bytes) else code for code in reply[:-2]]
        return Ingested([code == "a" for code in codes], int(reply[-2]), int(reply[-1]))

    async def stream_length(self) -> int:
        length = self._redis.xlen(self.keys.stream)
        return int(await within_deadline(length, self.deadline, "event store"))

    async def close(self) -> None:
        await self._redis.aclose()
