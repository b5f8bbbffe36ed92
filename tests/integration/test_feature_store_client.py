"""The async client on a real Redis: round trips, misses, corrupt values and metrics."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import redis
from prometheus_client import CollectorRegistry

from feature_store.client import FeatureStoreClient
from feature_store.schema import ItemRecord, UserRecord
from feature_store.writer import FeatureWriter

pytestmark = pytest.mark.integration

DIM = 4


def publish(url: str, namespace: str, tag: str = "a") -> int:
    writer = FeatureWriter(url, namespace)
    try:
        return writer.publish(
            [UserRecord("u1", ("i1", "i2"), f"{tag} likes", 2, 5.0), UserRecord("u2", ())],
            [ItemRecord(f"i{n}", f"{tag} {n}", embedding=np.full(DIM, n, np.float32))
             for n in range(1, 21)],
            manifest_id=tag, embedding_dim=DIM, progress=False,
        )  # fmt: skip
    finally:
        writer.close()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def client(redis_url, namespace, registry):
    store = FeatureStoreClient(
        redis_url, namespace, socket_timeout=1, connect_timeout=1, registry=registry
    )
    yield store
    await store.close()


def count_round_trips(store: FeatureStoreClient) -> list[int]:
    """Wrap the client's pipelines so each ``execute`` (one round trip) is counted."""
    calls = [0]
    make = store._redis.pipeline

    def pipeline(*args, **kwargs):
        pipe = make(*args, **kwargs)
        execute = pipe.execute

        async def counted(*a, **k):
            calls[0] += 1
            return await execute(*a, **k)

        pipe.execute = counted
        return pipe

    store._redis.pipeline = pipeline
    return calls


def metric(registry: CollectorRegistry, name: str, **labels) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_nothing_published_reads_as_no_version(client):
    read = await client.read_user("u1")
    assert (read.version, read.user) == (None, None)


async def test_each_stage_is_one_round_trip_once_the_version_is_known(client, redis_url, namespace):
    version = publish(redis_url, namespace)
    trips = count_round_trips(client)
    first = await client.read_user("u1")
    assert first.version == version and first.user.history == ("i1", "i2")
    assert trips[0] == 2  # alias unknown to this client: user + schema read again
    await client.read_user("u2")
    assert trips[0] == 3
    found = await client.read_items(version, [f"i{n}" for n in range(1, 21)])
    assert len(found) == 20 and trips[0] == 4
    np.testing.assert_array_equal(found["i7"].embedding, np.full(DIM, 7, np.float32))


async def test_items_of_a_version_unknown_to_the_client_still_take_one_round_trip(
    client, redis_url, namespace
):
    version = publish(redis_url, namespace)
    trips = count_round_trips(client)
    found = await client.read_items(version, ["i1", "i2", "i1"])
    assert set(found) == {"i1", "i2"} and trips[0] == 1
    assert await client.read_items(version, []) == {} and trips[0] == 1


async def test_the_client_follows_the_alias_to_a_new_version(client, redis_url, namespace):
    first = publish(redis_url, namespace, "a")
    assert (await client.read_user("u1")).version == first
    second = publish(redis_url, namespace, "b")
    read = await client.read_user("u1")
    assert read.version == second and read.user.preference == "b likes"
    items = await client.read_items(read.version, ["i3"])
    assert items["i3"].title == "b 3"


async def test_missing_users_and_items_are_misses(client, redis_url, namespace, registry):
    version = publish(redis_url, namespace)
    read = await client.read_user("nobody")
    assert read.version == version and read.user is None
    assert await client.read_items(version, ["nope", "i1"]) == {
        "i1": (await client.read_items(version, ["i1"]))["i1"]
    }
    assert await client.read_items(version + 99, ["i1"]) == {}  # a version that does not exist
    assert metric(registry, "tandem_feature_store_lookups_total", stage="user", result="miss") == 1
    assert metric(registry, "tandem_feature_store_lookups_total", stage="items", result="hit") == 2
    assert metric(registry, "tandem_feature_store_lookups_total", stage="items", result="miss") == 2


async def test_corrupt_values_are_logged_counted_and_read_as_missing(
    client, redis_url, namespace, registry, caplog
):
    version = publish(redis_url, namespace)
    raw = redis.Redis.from_url(redis_url)
    keys = client.keys
    raw.hset(keys.item(version, "i1"), "embedding", b"\x00" * 3)  # wrong byte length
    raw.delete(keys.item(version, "i2"))
    raw.set(keys.item(version, "i2"), "not a hash")  # WRONGTYPE
    raw.hset(keys.item(version, "i3"), "title", b"\xff\xfe")  # not UTF-8
    raw.hset(keys.user(version, "u1"), "history", "not json")
    with caplog.at_level(logging.WARNING, logger="feature_store.client"):
        found = await client.read_items(version, ["i1", "i2", "i3", "i4"])
        read = await client.read_user("u1")
    assert set(found) == {"i4"}
    assert read.version == version and read.user is None
    logged = " ".join(r.getMessage() for r in caplog.records)
    for key in (keys.item(version, "i1"), keys.item(version, "i2"), keys.user(version, "u1")):
        assert key in logged
    corrupt = "tandem_feature_store_errors_total"
    assert metric(registry, corrupt, stage="items", error_type="corrupt") == 3
    assert metric(registry, corrupt, stage="user", error_type="corrupt") == 1


async def test_a_corrupt_alias_reads_as_nothing_published(client, redis_url, namespace, registry):
    publish(redis_url, namespace)
    redis.Redis.from_url(redis_url).set(client.keys.alias, "v-two")
    read = await client.read_user("u1")
    assert (read.version, read.user) == (None, None)
    errors = "tandem_feature_store_errors_total"
    assert metric(registry, errors, stage="user", error_type="corrupt") == 1


async def test_latency_is_observed_per_stage(client, redis_url, namespace, registry):
    version = publish(redis_url, namespace)
    await client.read_user("u1")
    await client.read_items(version, ["i1"])
    count = "tandem_feature_store_read_seconds_count"
    assert metric(registry, count, stage="user") == 1
    assert metric(registry, count, stage="items") == 1
    assert metric(registry, "tandem_feature_store_version") == version
    assert await client.ping()


async def test_item_cache_serves_a_version_read_before_without_a_round_trip(
    redis_url, namespace, registry
):
    first = publish(redis_url, namespace, "a")
    store = FeatureStoreClient(
        redis_url, namespace, socket_timeout=1, connect_timeout=1, item_cache_size=5,
        registry=registry,
    )  # fmt: skip
    try:
        trips = count_round_trips(store)
        cold = await store.read_items(first, ["i1", "i2", "nope"])
        warm = await store.read_items(first, ["i2", "i1"])
        assert trips[0] == 1  # the second read came from the cache
        assert warm == {"i1": cold["i1"], "i2": cold["i2"]} and "nope" not in cold
        mixed = await store.read_items(first, ["i1", "i3"])  # only i3 (and "nope") go to Redis
        assert trips[0] == 2 and mixed["i3"].title == "a 3"
        second = publish(redis_url, namespace, "b")  # a new version: its own records
        assert (await store.read_items(second, ["i1"]))["i1"].title == "b 1"
        await store.read_items(first, [f"i{n}" for n in range(4, 11)])  # over the bound
        trips[0] = 0
        await store.read_items(first, ["i1"])  # evicted, so read again
        assert trips[0] == 1
    finally:
        await store.close()
    assert metric(registry, "tandem_feature_store_item_cache_lookups_total", result="hit") == 3
    assert metric(registry, "tandem_feature_store_item_cache_lookups_total", result="miss") == 13
