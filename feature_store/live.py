"""Live events in the feature store: their keys, stream ids, and how they join a snapshot.

A published version is a snapshot: each user's history as of the data it was built from.
Events accepted by ``POST /events`` since then live in two places of the namespace:

- ``events``                 stream, the durable log (one entry per accepted event);
- ``live:<user_id>``         list, the user's *live tail*: ``"<stream id>\\t<item id>"``
                             entries, oldest first, at most ``tail_cap`` of them (TTL);
- ``event:<event_id>``       string, the idempotency record of an accepted event (TTL);
- ``events:through``         hash, manifest id -> the last stream id its snapshot includes.

The composition rule (``merge_history``): the history served for a user under version ``v``
is ``v``'s stored history followed by the tail entries whose stream id is newer than ``v``'s
watermark (``events:through`` of its manifest; ``0-0`` when the snapshot holds no streamed
events), trimmed to the version's history cap. Versions are never mutated by events, so a
publish, a swap or a rollback can neither lose nor duplicate an event: each version simply
joins the tail at its own watermark. Events-side keys are not versioned, so the writer's
version cleanup leaves them alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from feature_store.schema import Keys

ZERO_ID = "0-0"  # a watermark that includes no streamed event
TAIL_SEPARATOR = "\t"  # ids never contain control characters (the API refuses them)
DEFAULT_TAIL_CAP = 200  # live entries kept per user: the default history cap
DEFAULT_STREAM_MAX = 1_000_000  # approximate stream length bound (XADD MAXLEN ~)
DEFAULT_DEDUP_TTL_S = 48 * 3600  # how long an event id is remembered (at least 24 h)
DEFAULT_TAIL_TTL_S = 30 * 24 * 3600  # the writer's user TTL: a silent user's tail expires too
EVENT_TYPES = ("interaction", "view", "click", "purchase")


@dataclass(frozen=True)
class EventKeys:
    """Key names of the events side of one namespace (validated by :class:`Keys`)."""

    namespace: str

    def __post_init__(self) -> None:
        Keys(self.namespace)

    @property
    def prefix(self) -> str:
        return f"tandem:{self.namespace}:"

    @property
    def stream(self) -> str:
        return f"{self.prefix}events"

    @property
    def through(self) -> str:
        return f"{self.prefix}events:through"

    def dedup(self, event_id: str) -> str:
        return f"{self.prefix}event:{event_id}"

    def tail(self, user_id: str) -> str:
        return f"{self.prefix}live:{user_id}"

    def follow(self, group: str, what: str) -> str:
        """State of the consumer group ``group``: ``counts`` and ``applied`` hashes."""
        return f"{self.prefix}events:group:{group}:{what}"


@dataclass(frozen=True)
class Event:
    """One accepted event as the stream stores it (``ts`` in epoch seconds)."""

    event_id: str
    user_id: str
    item_id: str
    type: str = "interaction"
    ts: float = 0.0
    request_id: str = ""

    def fields(self) -> list[str]:
        """The stream entry's field values, in ``STREAM_FIELDS`` order."""
        ts = repr(float(self.ts))
        return [self.event_id, self.user_id, self.item_id, self.type, ts, self.request_id]


STREAM_FIELDS = ("event_id", "user_id", "item_id", "type", "ts", "request_id")


def decode_entry(fields: dict[bytes, bytes]) -> Event:
    """An :class:`Event` from a stream entry's field map (bytes, as redis-py returns it)."""
    text = {k.decode(): v.decode() for k, v in fields.items()}
    return Event(
        event_id=text["event_id"],
        user_id=text["user_id"],
        item_id=text["item_id"],
        type=text.get("type", "interaction"),
        ts=float(text.get("ts", "0")),
        request_id=text.get("request_id", ""),
    )


def parse_id(stream_id: str | bytes) -> tuple[int, int]:
    """``"<ms>-<seq>"`` as a tuple that orders like the stream does."""
    text = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def tail_entry(stream_id: str, item_id: str) -> str:
    return f"{stream_id}{TAIL_SEPARATOR}{item_id}"


def newer_items(tail: Iterable[bytes | str], watermark: str = ZERO_ID) -> list[str]:
    """Item ids of the tail entries newer than ``watermark``, oldest first."""
    floor = parse_id(watermark)
    items = []
    for raw in tail:
        entry = raw.decode() if isinstance(raw, bytes) else raw
        stream_id, _, item_id = entry.partition(TAIL_SEPARATOR)
        if item_id and parse_id(stream_id) > floor:
            items.append(item_id)
    return items


def merge_history(
    stored: Sequence[str], tail: Iterable[bytes | str], watermark: str, cap: int
) -> tuple[str, ...]:
    """The composition rule: stored history + tail entries newer than the watermark, capped."""
    merged = [*stored, *newer_items(tail, watermark)]
    return tuple(merged[-cap:] if cap > 0 else [])
