"""Side features through a real Redis: published by the writer, read by the client, and a
version written in format 1 (before side features existed) still served."""

from __future__ import annotations

import dataclasses

import pytest
import redis
from prometheus_client import CollectorRegistry

from feature_store.client import FeatureStoreClient
from feature_store.dataset import records_from_dataset
from feature_store.schema import Keys, VersionSchema
from feature_store.writer import FeatureWriter
from tandem.data import UserProfile, UserProfiles

pytestmark = pytest.mark.integration


def write_format_1_snapshot(url: str, namespace: str, version: int = 41) -> None:
    """The keys a format-1 writer left: no side-feature fields anywhere."""
    keys = Keys(namespace)
    schema = VersionSchema(version, "old-run", "complete", users=1, items=1, format=1).to_hash()
    schema["user_fields"] = "history,preference,watermark,updated_at"
    schema["item_fields"] = "title,caption,text,embedding"
    client = redis.Redis.from_url(url)
    try:
        client.hset(keys.schema(version), mapping=schema)
        client.hset(
            keys.user(version, "u1"),
            mapping={"history": '["i1","i2"]', "watermark": "2", "updated_at": "5.0"},
        )
        client.hset(keys.item(version, "i1"), mapping={"title": "One"})
        client.zadd(keys.versions, {str(version): version})
        client.set(keys.alias, str(version))
    finally:
        client.close()


async def test_a_format_1_snapshot_is_still_served(redis_url, namespace):
    write_format_1_snapshot(redis_url, namespace)
    store = FeatureStoreClient(redis_url, namespace, registry=CollectorRegistry())
    try:
        read = await store.read_user("u1")
        assert read.version == 41
        assert read.user.history == ("i1", "i2") and read.user.age is None
        items = await store.read_items(41, ["i1"])
        assert items["i1"].title == "One" and items["i1"].genres == ()
    finally:
        await store.close()


async def test_published_side_features_reach_the_client(redis_url, namespace, tiny_dataset):
    user_id = tiny_dataset.interactions.user_ids[0]
    profiles = UserProfiles.from_profiles([UserProfile(user_id, 30, "F", "nurse", "02139")])
    dataset = dataclasses.replace(tiny_dataset, users=profiles)
    writer = FeatureWriter(redis_url, namespace)
    try:
        version = writer.publish(
            *records_from_dataset(dataset), manifest_id="side", embedding_dim=None, progress=False
        )
        assert writer.schema(version).format == 2
    finally:
        writer.close()
    store = FeatureStoreClient(redis_url, namespace, registry=CollectorRegistry())
    try:
        user = (await store.read_user(user_id)).user
        assert user == dataclasses.replace(
            user, age=30, gender="F", occupation="nurse", zip_code="02139"
        )
        other = (await store.read_user(tiny_dataset.interactions.user_ids[1])).user
        assert other.age is None and other.gender is None
        item_id = tiny_dataset.catalog.item_ids[0]
        item = (await store.read_items(version, [item_id]))[item_id]
        row = tiny_dataset.catalog.row(1)
        assert (item.year, item.genres) == (row["year"], row["genres"])
    finally:
        await store.close()
