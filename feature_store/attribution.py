"""Click attribution per ranker variant: each served answer is kept 24 h; an event that names
its ``request_id`` and one of its items is a hit for that answer's variant, at that rank.

Keys of one namespace (beside the events side of ``feature_store.live``):

- ``answer:<request_id>``   hash, TTL ``ANSWER_TTL_S``: ``user`` (who was answered),
                            ``variant``, ``i:<item id>`` -> 1-based rank; ``c:<item id>`` and
                            ``clicked`` mark what was already attributed;
- ``variants:attribution``  hash of counters, ``<variant>|<counter>``: ``requests``,
                            ``clicked_requests``, ``clicks``, ``rr`` (sum of 1/rank of the
                            clicked items) and ``rank:<r>`` (clicks at rank r).

An answer is recorded with its request count in one transaction (:meth:`AnswerLog.record`).
A hit is counted inside the event-ingest script (``feature_store.events``) by
``ATTRIBUTE_LUA``, so it happens exactly when the event is accepted: once per event id, and
once per (answer, item) however many events name that item. An event is attributed only to
an answer given to the same user, so a request id cannot be borrowed to move another
variant's figures. The counters are cumulative: ``tandem variants report`` reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from feature_store.client import within_deadline
from feature_store.connection import AsyncRedis, SyncRedis
from feature_store.schema import Keys

ANSWER_TTL_S = 24 * 3600  # how long an answer can still earn a click

# Runs inside the ingest script for each newly accepted event. Locals it expects: ``answer``
# (the answer key; for an event without a request id, a key that never exists), ``stats``,
# ``user_id``, ``item_id``. Increments ``attributed`` when the event is a new hit.
ATTRIBUTE_LUA = """
if redis.call('HGET', answer, 'user') == user_id then
  local variant = redis.call('HGET', answer, 'variant')
  local rank = redis.call('HGET', answer, 'i:' .. item_id)
  if variant and rank and redis.call('HSETNX', answer, 'c:' .. item_id, 1) == 1 then
    attributed = attributed + 1
    redis.call('HINCRBY', stats, variant .. '|clicks', 1)
    redis.call('HINCRBYFLOAT', stats, variant .. '|rr', 1 / tonumber(rank))
    redis.call('HINCRBY', stats, variant .. '|rank:' .. rank, 1)
    if redis.call('HSETNX', answer, 'clicked', 1) == 1 then
      redis.call('HINCRBY', stats, variant .. '|clicked_requests', 1)
    end
  end
end
"""


@dataclass(frozen=True)
class AttributionKeys:
    """Key names of the attribution side of one namespace (validated by :class:`Keys`)."""

    namespace: str

    def __post_init__(self) -> None:
        Keys(self.namespace)

    @property
    def stats(self) -> str:
        return f"tandem:{self.namespace}:variants:attribution"

    def answer(self, request_id: str) -> str:
        """The answer's key; an empty request id gets one that is never written."""
        return f"tandem:{self.namespace}:answer:{request_id or '-'}"


@dataclass(frozen=True)
class VariantCounts:
    """What the counters say of one variant."""

    variant: str
    requests: int
    clicked_requests: int  # answers with at least one attributed click
    clicks: int  # attributed (answer, item) hits
    reciprocal_rank_sum: float
    clicks_by_rank: dict[int, int]

    @property
    def mean_reciprocal_rank(self) -> float:
        """Mean of 1/rank over the clicked items (0 without clicks)."""
        return self.reciprocal_rank_sum / self.clicks if self.clicks else 0.0


def parse_counts(raw: dict[bytes | str, bytes | str]) -> list[VariantCounts]:
    """The counters hash -> one :class:`VariantCounts` per variant, sorted by name."""
    fields: dict[str, dict[str, str]] = {}
    for key, value in raw.items():
        key = key.decode() if isinstance(key, bytes) else key
        value = value.decode() if isinstance(value, bytes) else value
        variant, _, counter = key.rpartition("|")
        fields.setdefault(variant, {})[counter] = value
    return [
        VariantCounts(
            variant=name,
            requests=int(values.get("requests", 0)),
            clicked_requests=int(values.get("clicked_requests", 0)),
            clicks=int(values.get("clicks", 0)),
            reciprocal_rank_sum=float(values.get("rr", 0.0)),
            clicks_by_rank={
                int(counter.removeprefix("rank:")): int(count)
                for counter, count in values.items()
                if counter.startswith("rank:")
            },
        )
        for name, values in sorted(fields.items())
    ]


def read_counts(client: SyncRedis, namespace: str) -> list[VariantCounts]:
    """The cumulative counters of every variant that has served (offline: CLI, benchmark)."""
    return parse_counts(client.hgetall(AttributionKeys(namespace).stats))


class AnswerLog:
    """Records served answers (async, the gateway's side); share one per process."""

    def __init__(self, client: AsyncRedis, namespace: str, *, deadline: float = 0.25):
        self.keys = AttributionKeys(namespace)
        self.deadline = deadline
        self._redis = client

    async def record(
        self, request_id: str, user_id: str, variant: str, item_ids: Sequence[str]
    ) -> None:
        """Keep the answer for ``ANSWER_TTL_S`` and count the request, in one transaction;
        FeatureStoreUnavailable when Redis does not answer in time."""
        key = self.keys.answer(request_id)
        mapping = {"user": user_id, "variant": variant}
        mapping |= {f"i:{item}": str(rank) for rank, item in enumerate(item_ids, start=1)}
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(key, mapping=mapping)
        pipe.expire(key, ANSWER_TTL_S)
        pipe.hincrby(self.keys.stats, f"{variant}|requests", 1)
        await within_deadline(pipe.execute(), self.deadline, "answer log")

    async def counts(self) -> list[VariantCounts]:
        """The cumulative counters (for the gateway's gauges)."""
        stats = self._redis.hgetall(self.keys.stats)
        return parse_counts(await within_deadline(stats, self.deadline, "answer log"))

    async def close(self) -> None:
        await self._redis.aclose()
