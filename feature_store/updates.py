"""Incremental user updates on the serving version, between full publishes.

The online path records new interactions and preference texts with one atomic server-side
script per user: append the items (oldest first), keep the newest ``history_cap``, set the
optional preference and watermark, refresh the TTL. The next full publish replaces these
records, so its input must include the same events.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from feature_store.connection import SyncRedis
from feature_store.errors import FeatureStoreError
from feature_store.versions import VersionRegistry

# cjson writes an empty array as {}, so an empty history is written as [] explicitly; the
# reader accepts both.
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


class UserUpdates:
    """Atomic per-user updates of the serving version of one namespace."""

    def __init__(
        self, client: SyncRedis, versions: VersionRegistry, *, history_cap: int, user_ttl_s: int
    ):
        """``history_cap`` applies to versions whose schema does not record its own cap."""
        self._versions = versions
        self.keys = versions.keys
        self.history_cap = history_cap
        self.user_ttl_s = user_ttl_s
        self._script = client.register_script(_UPDATE_USER)

    def update_user(
        self,
        user_id: str,
        *,
        new_items: Sequence[str] = (),
        preference: str | None = None,
        watermark: int | None = None,
    ) -> None:
        """Append interactions (oldest first) and/or set the preference; creates unknown users."""
        if not user_id:
            raise ValueError("user id must be a non-empty string")
        if any(not isinstance(i, str) or not i for i in new_items):
            raise ValueError("new_items must be non-empty item id strings")
        version = self._versions.current()
        if version is None:
            raise FeatureStoreError(
                f"nothing published in namespace {self.keys.namespace!r}: "
                "run `tandem features publish` first"
            )
        schema = self._versions.schema(version)
        cap = schema.history_cap if schema is not None else self.history_cap
        self._script(
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
