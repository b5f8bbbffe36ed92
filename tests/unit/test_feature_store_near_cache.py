"""The near-cache's rules: consulted only on store failure, bounded, expiring, counted.

The store behind it is a small stand-in whose only job is to fail on demand; the real Redis
outage is exercised in tests/integration/test_gateway_near_cache.py.
"""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from feature_store.client import FeatureStoreUnavailable, UserRead
from feature_store.near_cache import NearCache, StaleUserRead
from feature_store.schema import UserRecord


class FlakyStore:
    """Answers from a dict; ``failure`` (an exception) or ``hang`` make reads fail."""

    def __init__(self) -> None:
        self.users = {f"u{n}": UserRecord(f"u{n}", (f"i{n}",), updated_at=1.0) for n in range(5)}
        self.version = 3
        self.failure: Exception | None = None
        self.hang = False

    async def read_user(self, user_id: str) -> UserRead:
        if self.hang:
            await asyncio.sleep(10)
        if self.failure is not None:
            raise self.failure
        return UserRead(self.version, self.users.get(user_id))

    async def read_items(self, version, item_ids):
        return {}

    async def ping(self) -> bool:
        return self.failure is None

    async def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lookups(registry: CollectorRegistry, result: str) -> float:
    name = "tandem_feature_store_near_cache_lookups_total"
    return registry.get_sample_value(name, {"result": result}) or 0.0


@pytest.fixture
def parts():
    store, clock, registry = FlakyStore(), Clock(), CollectorRegistry()
    cache = NearCache(store, max_users=3, ttl_s=60, deadline_s=0.05, registry=registry, clock=clock)
    return store, clock, registry, cache


DOWN = FeatureStoreUnavailable("connection refused", "connection")


async def test_a_working_store_is_always_asked_and_its_answer_is_fresh(parts):
    store, _, registry, cache = parts
    first = await cache.read_user("u1")
    store.users["u1"] = UserRecord("u1", ("i1", "i9"), updated_at=2.0)
    second = await cache.read_user("u1")
    assert not isinstance(second, StaleUserRead) and second.user.history == ("i1", "i9")
    assert first.user.history == ("i1",)
    assert lookups(registry, "hit") == lookups(registry, "miss") == 0


async def test_a_failing_store_answers_from_the_cache_labelled_stale(parts):
    store, clock, registry, cache = parts
    await cache.read_user("u1")
    store.failure = DOWN
    clock.now += 30
    read = await cache.read_user("u1")
    assert isinstance(read, StaleUserRead)
    assert (read.version, read.user.history, read.age_s) == (3, ("i1",), 30)
    assert read.error_type == "connection"
    with pytest.raises(FeatureStoreUnavailable):
        await cache.read_user("u2")  # never read: nothing to serve
    assert (lookups(registry, "hit"), lookups(registry, "miss")) == (1, 1)


async def test_a_store_past_the_deadline_answers_from_the_cache(parts):
    store, _, _, cache = parts
    await cache.read_user("u1")
    store.hang = True
    read = await asyncio.wait_for(cache.read_user("u1"), 1.0)
    assert isinstance(read, StaleUserRead) and read.error_type == "timeout"
    with pytest.raises(FeatureStoreUnavailable, match="near-cache deadline") as info:
        await cache.read_user("u2")
    assert info.value.error_type == "timeout"


async def test_records_older_than_the_ttl_are_not_served(parts):
    store, clock, registry, cache = parts
    await cache.read_user("u1")
    store.failure = DOWN
    clock.now += 61
    with pytest.raises(FeatureStoreUnavailable):
        await cache.read_user("u1")
    assert len(cache) == 0 and lookups(registry, "miss") == 1


async def test_the_cache_keeps_only_the_most_recently_read_users(parts):
    store, _, _, cache = parts
    for user in ("u0", "u1", "u2", "u0", "u3"):  # u0 read again: u1 is the oldest
        await cache.read_user(user)
    assert len(cache) == 3
    store.failure = DOWN
    assert isinstance(await cache.read_user("u0"), StaleUserRead)
    with pytest.raises(FeatureStoreUnavailable):
        await cache.read_user("u1")


async def test_a_user_the_store_no_longer_has_is_not_served_stale(parts):
    store, _, _, cache = parts
    await cache.read_user("u1")
    del store.users["u1"]
    assert (await cache.read_user("u1")).user is None
    store.failure = DOWN
    with pytest.raises(FeatureStoreUnavailable):
        await cache.read_user("u1")


def test_bounds_must_be_positive():
    with pytest.raises(ValueError, match="max_users"):
        NearCache(FlakyStore(), max_users=0, ttl_s=1, registry=CollectorRegistry())
    with pytest.raises(ValueError, match="ttl_s"):
        NearCache(FlakyStore(), max_users=1, ttl_s=0, registry=CollectorRegistry())
