"""The same store on a real local 3-master Redis Cluster (redis-py's cluster clients)."""

from __future__ import annotations

import asyncio
import time
import uuid

import numpy as np
import pytest
import redis
from redis.exceptions import RedisClusterException

from feature_store.client import FeatureStoreClient, FeatureStoreUnavailable
from feature_store.schema import ItemRecord, UserRecord
from feature_store.writer import FeatureWriter
from tandem.testing.private_redis import start_cluster

pytestmark = pytest.mark.integration

DIM = 16


def records(tag: str) -> tuple[list[UserRecord], list[ItemRecord]]:
    users = [UserRecord(f"u{n}", tuple(f"i{k}" for k in range(n, n + 5)), f"{tag} {n}", n)
             for n in range(40)]  # fmt: skip
    items = [ItemRecord(f"i{n}", f"{tag} item {n}", embedding=np.full(DIM, n / 10, np.float32))
             for n in range(60)]  # fmt: skip
    return users, items


async def test_publish_read_update_and_rollback_on_a_cluster(redis_cluster_url):
    namespace = f"cluster-{uuid.uuid4().hex[:8]}"
    writer = FeatureWriter(redis_cluster_url, namespace, cluster=True, keep_versions=2)
    client = FeatureStoreClient(
        redis_cluster_url, namespace, cluster=True, socket_timeout=1, connect_timeout=1
    )
    try:
        first = writer.publish(*records("a"), manifest_id="a", embedding_dim=DIM, progress=False)
        cluster = redis.RedisCluster.from_url(redis_cluster_url)
        primaries = cluster.get_primaries()
        sizes = [redis.Redis(host=node.host, port=node.port).dbsize() for node in primaries]
        assert len(sizes) == 3 and all(size > 0 for size in sizes)  # keys spread over nodes
        cluster.close()

        read = await client.read_user("u7")
        assert read.version == first and read.user.history == tuple(f"i{k}" for k in range(7, 12))
        found = await client.read_items(first, [f"i{n}" for n in range(20)] + ["missing"])
        assert len(found) == 20
        np.testing.assert_allclose(found["i13"].embedding, np.full(DIM, 1.3), atol=1e-3)

        writer.update_user("u7", new_items=["i59"], preference="new taste", watermark=6)
        updated = (await client.read_user("u7")).user
        assert updated.history[-1] == "i59" and updated.preference == "new taste"

        second = writer.publish(*records("b"), manifest_id="b", embedding_dim=DIM, progress=False)
        assert (await client.read_user("u1")).user.preference == "b 1"
        third = writer.publish(*records("c"), manifest_id="c", embedding_dim=DIM, progress=False)
        assert [s.version for s in writer.versions()] == [second, third]  # cluster-wide SCAN

        assert writer.rollback() == second
        read = await client.read_user("u1")
        assert read.version == second and read.user.preference == "b 1"
        assert (await client.read_items(second, ["i2"]))["i2"].title == "b item 2"
        assert writer.status().used_memory_bytes > 0
    finally:
        await client.close()
        writer.close()


async def test_a_dead_cluster_node_is_unavailable_in_time_and_the_client_recovers(tmp_path):
    nodes = start_cluster(tmp_path)
    url = nodes[0].url
    writer = FeatureWriter(url, "drill", cluster=True)
    client = FeatureStoreClient(
        url, "drill", cluster=True, socket_timeout=0.1, connect_timeout=0.1, deadline=0.3
    )
    try:
        version = writer.publish(*records("a"), manifest_id="a", embedding_dim=DIM, progress=False)
        assert (await client.read_user("u1")).version == version
        owner = redis.RedisCluster.from_url(url).get_node_from_key(writer.keys.alias)
        victim = next(node for node in nodes if node.port == owner.port)
        victim.kill()
        start = time.perf_counter()
        with pytest.raises(FeatureStoreUnavailable):
            await client.read_user("u1")
        assert time.perf_counter() - start < 0.3 + 0.5
        victim.start()  # same port and nodes.conf: it rejoins with its slots, without its data
        deadline = time.monotonic() + 20
        while True:
            try:
                version = writer.publish(*records("b"), manifest_id="b", embedding_dim=DIM,
                                         progress=False)  # fmt: skip
                break
            except (redis.RedisError, RedisClusterException):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        for _ in range(50):  # the client finds the healed cluster by itself
            try:
                read = await client.read_user("u1")
                break
            except FeatureStoreUnavailable:
                await asyncio.sleep(0.1)
        assert read.version == version and read.user.preference == "b 1"
    finally:
        await client.close()
        writer.close()
        for node in nodes:
            node.stop()
