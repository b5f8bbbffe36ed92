"""Live events on a real Redis: atomic ingest, idempotency, and how they join published versions."""

from __future__ import annotations

import pytest
import redis
from prometheus_client import CollectorRegistry

from feature_store.client import FeatureStoreClient, FeatureStoreUnavailable
from feature_store.event_log import EventLog
from feature_store.events import EventStore
from feature_store.live import Event, merge_history
from feature_store.schema import ItemRecord, UserRecord
from feature_store.writer import FeatureWriter

pytestmark = pytest.mark.integration


def publish(url: str, namespace: str, manifest: str, history: tuple[str, ...] = ("i1", "i2")):
    writer = FeatureWriter(url, namespace, history_cap=5)
    try:
        return writer.publish(
            [UserRecord("u1", history, "likes things", 2)],
            [ItemRecord(f"i{n}", f"item {n}") for n in range(1, 30)],
            manifest_id=manifest, embedding_dim=None, progress=False,
        )  # fmt: skip
    finally:
        writer.close()


def event(n: int, user: str = "u1", item: str | None = None) -> Event:
    return Event(f"e{n}", user, item or f"i{n}", ts=1000.0 + n)


@pytest.fixture
async def store(redis_url, namespace):
    events = EventStore(redis_url, namespace)
    yield events
    await events.close()


@pytest.fixture
async def client(redis_url, namespace):
    reader = FeatureStoreClient(
        redis_url, namespace, socket_timeout=1, connect_timeout=1, registry=CollectorRegistry()
    )
    yield reader
    await reader.close()


@pytest.fixture
def log(redis_url, namespace):
    events = EventLog(redis_url, namespace)
    yield events
    events.close()


def test_merge_keeps_only_entries_newer_than_the_watermark_and_caps():
    tail = [b"5-0\ti7", b"9-0\ti8", b"9-1\ti9"]
    assert merge_history(("i1", "i2"), tail, "0-0", 10) == ("i1", "i2", "i7", "i8", "i9")
    assert merge_history(("i1", "i2"), tail, "9-0", 10) == ("i1", "i2", "i9")
    assert merge_history(("i1", "i2"), tail, "0-0", 3) == ("i7", "i8", "i9")


async def test_accepted_events_are_read_as_the_newest_history(redis_url, namespace, store, client):
    publish(redis_url, namespace, "a")
    result = await store.ingest([event(3), event(4)])
    assert result.accepted == [True, True] and result.stream_length == 2
    read = await client.read_user("u1")
    assert read.user.history == ("i1", "i2", "i3", "i4")
    assert read.user.preference == "likes things"


async def test_an_event_id_is_applied_once_even_from_a_new_store_instance(
    redis_url, namespace, store, client
):
    publish(redis_url, namespace, "a")
    assert (await store.ingest([event(3), event(3)])).accepted == [True, False]
    restarted = EventStore(redis_url, namespace)
    try:
        again = await restarted.ingest([event(3), event(4)])
    finally:
        await restarted.close()
    assert again.accepted == [False, True] and again.stream_length == 2
    assert (await client.read_user("u1")).user.history == ("i1", "i2", "i3", "i4")
    ttl = redis.Redis.from_url(redis_url).ttl(f"tandem:{namespace}:event:e3")
    assert ttl > 24 * 3600


async def test_events_survive_a_publish_and_are_not_doubled_by_one_that_includes_them(
    redis_url, namespace, store, client, log
):
    publish(redis_url, namespace, "a")
    await store.ingest([event(3)])
    publish(redis_url, namespace, "b")  # a snapshot without streamed events: the tail joins it
    assert (await client.read_user("u1")).user.history == ("i1", "i2", "i3")
    log.set_snapshot_watermark("c", log.last_id())  # this snapshot already holds e3
    await store.ingest([event(4)])
    publish(redis_url, namespace, "c", history=("i1", "i2", "i3"))
    assert (await client.read_user("u1")).user.history == ("i1", "i2", "i3", "i4")
    assert log.serving_user("u1").user.history == ("i1", "i2", "i3", "i4")


async def test_rollback_joins_the_tail_at_the_older_versions_watermark(
    redis_url, namespace, store, client, log
):
    publish(redis_url, namespace, "a")
    await store.ingest([event(3)])
    log.set_snapshot_watermark("b", log.last_id())
    publish(redis_url, namespace, "b", history=("i1", "i2", "i3"))
    writer = FeatureWriter(redis_url, namespace)
    writer.rollback()
    writer.close()
    assert (await client.read_user("u1")).user.history == ("i1", "i2", "i3")


async def test_a_user_known_only_from_events_gets_a_history(redis_url, namespace, store, client):
    publish(redis_url, namespace, "a")
    await store.ingest([event(5, user="new"), event(6, user="new")])
    assert (await client.read_user("new")).user.history == ("i5", "i6")


async def test_unreachable_store_raises_unavailable_within_the_deadline():
    events = EventStore("redis://127.0.0.1:1/0", "x", deadline=0.2)
    try:
        with pytest.raises(FeatureStoreUnavailable):
            await events.ingest([event(1)])
    finally:
        await events.close()
