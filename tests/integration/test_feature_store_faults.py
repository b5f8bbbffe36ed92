"""Fault drills on a private redis-server: down, slow, killed mid-read, restarted.

Only the test's own server process is paused or killed, never the shared 6379 server.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry

from feature_store.client import FeatureStoreClient, FeatureStoreUnavailable
from feature_store.schema import ItemRecord, UserRecord
from feature_store.writer import FeatureWriter
from tandem.testing.private_redis import RedisProcess, free_port

pytestmark = pytest.mark.integration

DEADLINE = 0.2
SLACK = 0.3  # scheduling noise on a busy 2-core machine


def publish(url: str) -> int:
    writer = FeatureWriter(url, "drill")
    try:
        return writer.publish([UserRecord("u1", ("i1",))], [ItemRecord("i1", "One")],
                              manifest_id="m", embedding_dim=None, progress=False)  # fmt: skip
    finally:
        writer.close()


def make_client(url: str, registry: CollectorRegistry) -> FeatureStoreClient:
    return FeatureStoreClient(
        url, "drill", socket_timeout=0.1, connect_timeout=0.1, deadline=DEADLINE, registry=registry
    )


async def expect_unavailable(call, error_types: set[str]) -> float:
    start = time.perf_counter()
    with pytest.raises(FeatureStoreUnavailable) as info:
        await call()
    elapsed = time.perf_counter() - start
    assert info.value.error_type in error_types, info.value
    assert elapsed < DEADLINE + SLACK
    return elapsed


async def test_unreachable_redis_is_unavailable_within_the_deadline():
    registry = CollectorRegistry()
    client = make_client(f"redis://127.0.0.1:{free_port()}/0", registry)
    try:
        await expect_unavailable(lambda: client.read_user("u1"), {"connection"})
        await expect_unavailable(lambda: client.read_items(1, ["i1"]), {"connection"})
        assert not await client.ping()
    finally:
        await client.close()
    errors = "tandem_feature_store_errors_total"
    labels = {"stage": "user", "error_type": "connection"}
    assert registry.get_sample_value(errors, labels) == 1


async def test_a_hung_redis_times_out_within_the_deadline_and_recovers(redis_process: RedisProcess):
    version = publish(redis_process.url)
    client = make_client(redis_process.url, CollectorRegistry())
    try:
        assert (await client.read_user("u1")).version == version
        redis_process.pause()
        try:
            await expect_unavailable(lambda: client.read_user("u1"), {"timeout"})
            await expect_unavailable(lambda: client.read_items(version, ["i1"]), {"timeout"})
        finally:
            redis_process.resume()
        read = await client.read_user("u1")
        assert read.user is not None
        assert "i1" in await client.read_items(version, ["i1"])
    finally:
        await client.close()


async def test_redis_killed_mid_read_then_restarted_reconnects_by_itself(
    redis_process: RedisProcess,
):
    publish(redis_process.url)
    client = make_client(redis_process.url, CollectorRegistry())
    try:
        assert (await client.read_user("u1")).user is not None
        redis_process.pause()  # the read below is in flight when the server dies
        pending = asyncio.ensure_future(client.read_user("u1"))
        await asyncio.sleep(0.03)
        redis_process.kill()
        with pytest.raises(FeatureStoreUnavailable):
            await pending
        await expect_unavailable(lambda: client.read_user("u1"), {"connection"})
        redis_process.start()  # same port, empty: Redis came back without its data
        assert (await client.read_user("u1")).version is None
        version = publish(redis_process.url)
        read = await client.read_user("u1")
        assert read.version == version and read.user.history == ("i1",)
    finally:
        await client.close()
