"""Publishing on a real Redis: versions, atomic swap, idempotence, resume, rollback, updates."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import numpy as np
import pytest
import redis

from feature_store.client import FeatureStoreClient
from feature_store.schema import ItemRecord, UserRecord
from feature_store.writer import FeatureStoreError, FeatureWriter

pytestmark = pytest.mark.integration

DIM = 8


def users(tag: str, count: int = 12) -> list[UserRecord]:
    return [
        UserRecord(f"u{n}", tuple(f"i{(n + k) % 30}" for k in range(n % 7 + 1)),
                   f"{tag} pref {n}", n, 1000.0 + n)
        for n in range(count)
    ]  # fmt: skip


def items(tag: str, count: int = 30) -> list[ItemRecord]:
    rng = np.random.default_rng(len(tag))
    return [
        ItemRecord(f"i{n}", f"{tag} title {n}", f"{tag} caption" if n % 2 else None, None,
                   rng.standard_normal(DIM).astype(np.float32))
        for n in range(count)
    ]  # fmt: skip


@pytest.fixture
def writer(redis_url: str, namespace: str) -> Iterator[FeatureWriter]:
    w = FeatureWriter(redis_url, namespace, user_ttl_s=3600)
    yield w
    w.close()


def publish(writer: FeatureWriter, tag: str, **kwargs) -> int:
    return writer.publish(
        users(tag), items(tag), manifest_id=tag, embedding_dim=DIM, progress=False, **kwargs
    )


def publish_records(writer: FeatureWriter, user_records, item_records, **kwargs) -> int:
    return writer.publish(
        user_records, item_records, manifest_id="a", embedding_dim=DIM, progress=False, **kwargs
    )


def read(url: str, namespace: str, user_id: str, item_ids: list[str]):
    async def go():
        client = FeatureStoreClient(url, namespace, socket_timeout=1, connect_timeout=1)
        try:
            user = await client.read_user(user_id)
            found = await client.read_items(user.version, item_ids) if user.version else {}
            return user, found
        finally:
            await client.close()

    return asyncio.run(go())


def test_publish_writes_a_complete_version_and_flips_the_alias(writer, redis_url, namespace):
    version = publish(writer, "a", batch_size=7)
    assert writer.current_version() == version
    schema = writer.schema(version)
    assert (schema.state, schema.users, schema.items) == ("complete", 12, 30)
    assert (schema.embedding_dim, schema.embedding_dtype) == (DIM, "float16")
    assert schema.manifest_id == "a"
    user, found = read(redis_url, namespace, "u3", ["i1", "i2", "nope"])
    assert user.version == version
    assert user.user == users("a")[3]
    assert set(found) == {"i1", "i2"}
    assert found["i1"].caption == "a caption" and found["i2"].caption is None
    np.testing.assert_allclose(found["i1"].embedding, items("a")[1].embedding, rtol=1e-3, atol=1e-3)


def test_user_records_carry_the_configured_ttl(writer, redis_url, namespace):
    version = publish(writer, "a")
    ttl = redis.Redis.from_url(redis_url).ttl(writer.keys.user(version, "u1"))
    assert 3500 < ttl <= 3600
    assert redis.Redis.from_url(redis_url).ttl(writer.keys.item(version, "i1")) == -1


def test_publishing_the_same_manifest_again_changes_nothing(writer):
    first = publish(writer, "a")
    assert publish(writer, "a") == first
    assert [s.version for s in writer.versions()] == [first]
    assert writer.history() == [first]


def test_an_interrupted_publish_resumes_from_its_checkpoint(writer, redis_url, namespace):
    records = items("a")

    def crashing() -> Iterator[ItemRecord]:
        for n, item in enumerate(records):
            if n == 17:
                raise RuntimeError("simulated crash")
            yield item

    with pytest.raises(RuntimeError, match="simulated crash"):
        writer.publish(users("a"), crashing(), manifest_id="a", embedding_dim=DIM,
                       batch_size=5, progress=False)  # fmt: skip
    assert writer.current_version() is None  # nothing half-written is ever served
    partial = writer.versions()[0]
    # items 15..19 failed to build while 10..14 were in flight (unacknowledged): checkpoint 10
    assert (partial.state, partial.users, partial.items) == ("writing", 12, 10)

    writes: list[str] = []

    def counted() -> Iterator[ItemRecord]:
        for item in records:
            writes.append(item.item_id)
            yield item

    version = writer.publish(users("a"), counted(), manifest_id="a", embedding_dim=DIM,
                             batch_size=5, progress=False)  # fmt: skip
    assert version == partial.version
    assert writer.schema(version).items == 30
    assert len(writes) == 30  # the 15 done were skipped, not re-encoded into new keys
    _, found = read(redis_url, namespace, "u1", [f"i{n}" for n in range(30)])
    assert len(found) == 30


def test_resume_refuses_different_input_and_can_start_over(writer):
    def crashing() -> Iterator[ItemRecord]:
        yield from items("a")[:10]
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        writer.publish(users("a"), crashing(), manifest_id="a", embedding_dim=DIM,
                       batch_size=5, progress=False)  # fmt: skip
    with pytest.raises(FeatureStoreError, match="input differs"):
        writer.publish(users("a"), items("a")[::-1], manifest_id="a", embedding_dim=DIM,
                       batch_size=5, progress=False)  # fmt: skip
    version = publish(writer, "a", resume=False)
    assert writer.current_version() == version
    assert writer.schema(version).items == 30


def test_rollback_serves_the_previous_version_and_then_has_nowhere_to_go(writer):
    first = publish(writer, "a")
    second = publish(writer, "b")
    assert writer.rollback() == first
    assert writer.current_version() == first
    with pytest.raises(FeatureStoreError, match="no previous version"):
        writer.rollback()
    # publishing the rolled-back manifest again re-activates it without rewriting
    assert publish(writer, "b") == second
    assert writer.current_version() == second


def test_only_keep_versions_activated_versions_survive_a_publish(writer, redis_url):
    client = redis.Redis.from_url(redis_url)
    v1, v2, v3 = (publish(writer, tag) for tag in ("a", "b", "c"))
    assert [s.version for s in writer.versions()] == [v2, v3]
    assert not list(client.scan_iter(match=writer.keys.version_pattern(v1)))
    writer.rollback()  # back to v2; v3 stays until the next publish
    v4 = publish(writer, "d")
    assert [s.version for s in writer.versions()] == [v2, v4]
    assert writer.history()[:2] == [v4, v2]


def test_readers_never_see_a_mix_of_two_versions(writer, redis_url, namespace):
    publish(writer, "a")
    stop = threading.Event()
    seen: list[set[str]] = []

    async def reader() -> None:
        client = FeatureStoreClient(redis_url, namespace, socket_timeout=1, connect_timeout=1)
        try:
            while not stop.is_set():
                user = await client.read_user("u2")
                found = await client.read_items(user.version, [f"i{n}" for n in range(30)])
                tags = {item.title.split()[0] for item in found.values()}
                tags.add(user.user.preference.split()[0])
                seen.append(tags)
                await asyncio.sleep(0)
        finally:
            await client.close()

    thread = threading.Thread(target=lambda: asyncio.run(reader()))
    thread.start()
    try:
        for tag in ("b", "c", "d", "e"):
            writer.publish(users(tag), items(tag), manifest_id=tag, embedding_dim=DIM,
                           batch_size=4, progress=False)  # fmt: skip
    finally:
        stop.set()
        thread.join(10)
    assert seen and all(len(tags) == 1 for tags in seen)
    assert len({next(iter(tags)) for tags in seen}) > 1  # the reader did follow the swaps


def test_incremental_update_appends_caps_and_sets_the_preference(redis_url, namespace):
    writer = FeatureWriter(redis_url, namespace, history_cap=5, user_ttl_s=100)
    try:
        version = publish(writer, "a")
        writer.update_user("u6", new_items=["x1", "x2"])
        writer.update_user("u6", preference="now into jazz", watermark=9)
        writer.update_user("new-user", new_items=["y"])
        user, _ = read(redis_url, namespace, "u6", [])
        assert user.user.history == ("i10", "i11", "i12", "x1", "x2")
        assert (user.user.preference, user.user.watermark) == ("now into jazz", 9)
        fresh, _ = read(redis_url, namespace, "new-user", [])
        assert fresh.user.history == ("y",) and fresh.user.preference is None
        assert fresh.user.watermark == 0
        ttl = redis.Redis.from_url(redis_url).ttl(writer.keys.user(version, "new-user"))
        assert 90 < ttl <= 100
    finally:
        writer.close()


def test_update_before_any_publish_is_a_clear_error(writer):
    with pytest.raises(FeatureStoreError, match="nothing published"):
        writer.update_user("u1", new_items=["i1"])


def test_a_second_operator_is_turned_away_while_the_namespace_is_locked(writer, redis_url):
    redis.Redis.from_url(redis_url).set(writer.keys.lock, "publish other pid=1", px=5000)
    with pytest.raises(FeatureStoreError, match="busy"):
        publish(writer, "a")


def test_a_publish_that_lost_its_lock_stops_and_says_so(writer, redis_url):
    def stolen() -> Iterator[ItemRecord]:
        yield from items("a")[:5]
        redis.Redis.from_url(redis_url).set(writer.keys.lock, "someone else", px=5000)
        yield from items("a")[5:]

    with pytest.raises(FeatureStoreError, match="lost the lock"):
        publish_records(writer, users("a"), stolen(), batch_size=5)
    assert redis.Redis.from_url(redis_url).get(writer.keys.lock) == b"someone else"  # kept
    assert writer.current_version() is None


def test_the_lock_is_released_after_each_operation_and_names_its_holder(writer, redis_url):
    client = redis.Redis.from_url(redis_url)
    seen: list[bytes | None] = []

    def watched() -> Iterator[ItemRecord]:
        seen.append(client.get(writer.keys.lock))
        yield from items("a")

    publish_records(writer, users("a"), watched())
    assert seen[0] is not None and seen[0].startswith(b"publish a pid=")
    assert client.get(writer.keys.lock) is None
    publish(writer, "b")  # the next operation gets the lock


def test_status_reports_versions_counts_and_memory(writer):
    version = publish(writer, "a")
    info = writer.status()
    assert info.current == version and info.history == [version]
    assert [s.items for s in info.versions] == [30]
    assert info.used_memory_bytes > 0
    assert info.bytes_per_item > DIM * 2 and info.bytes_per_user > 0


def test_a_bulk_batch_reports_error_replies_and_its_connection_stays_usable(redis_url, namespace):
    from feature_store.packed import PackedPipeline

    client = redis.Redis.from_url(redis_url)
    key = f"tandem:{namespace}:oops"
    pipe = PackedPipeline(client)
    pipe.command("SET", key, "a string")
    pipe.command("HSET", key, "field", "value")
    pipe.command("SET", key + ":after", "still written")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        pipe.execute()
    assert client.get(key + ":after") == b"still written"
    pipe.command("SET", key, "again")
    pipe.execute()
    assert client.get(key) == b"again"
