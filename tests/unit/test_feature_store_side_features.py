"""Side features in the feature store codecs (format 2), and format-1 values still read."""

from __future__ import annotations

import dataclasses

import pytest

from feature_store.dataset import load_sources, records_from_dataset
from feature_store.schema import (
    FORMAT,
    CorruptValueError,
    ItemRecord,
    UserRecord,
    VersionSchema,
    decode_item,
    decode_user,
    encode_item,
    encode_user,
)
from tandem.data import UserProfile, UserProfiles


def _bytes(fields: dict) -> dict[bytes, bytes]:
    return {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in fields.items()}


def test_user_side_features_round_trip_and_missing_ones_are_not_written():
    user = UserRecord("u1", ("i1",), None, 0, 1.0, age=24, gender="M", occupation="technician")
    fields = encode_user(user, history_cap=5)
    assert "zip_code" not in fields
    assert decode_user("u1", _bytes(fields), "k") == user


def test_item_year_and_genres_round_trip():
    item = ItemRecord("i1", "Heat", year=1995, genres=("Action", "Crime"))
    assert decode_item("i1", _bytes(encode_item(item, None)), "k", None) == item
    bare = encode_item(ItemRecord("i2", "T"), None)
    assert set(bare) == {"title"}


def test_format_1_records_read_as_having_no_side_features():
    user = decode_user("u", {b"history": b'["i1"]', b"watermark": b"1", b"updated_at": b"2"}, "k")
    assert (user.age, user.gender, user.occupation, user.zip_code) == (None, None, None, None)
    item = decode_item("i", {b"title": b"T"}, "k", None)
    assert (item.year, item.genres) == (None, ())


def test_a_format_1_schema_still_reads_and_keeps_its_format():
    old = VersionSchema(3, "m", "complete", format=1).to_hash()
    old["user_fields"] = "history,preference,watermark,updated_at"
    old["item_fields"] = "title,caption,text,embedding"
    schema = VersionSchema.from_hash(_bytes(old), "k")
    assert schema.format == 1 and FORMAT == 2
    assert "age" not in schema.user_fields
    new = VersionSchema(4, "m", "complete")
    assert VersionSchema.from_hash(_bytes(new.to_hash()), "k") == new


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({b"title": b"T", b"year": b"nineteen"}, "year"),
        ({b"title": b"T", b"genres": b"Drama"}, "genres"),
        ({b"title": b"T", b"genres": b"[1]"}, "genres"),
    ],
)
def test_corrupt_item_side_features_name_the_field(raw, field):
    with pytest.raises(CorruptValueError) as info:
        decode_item("i", raw, "k", None)
    assert info.value.field == field


def test_corrupt_user_age_names_the_field():
    with pytest.raises(CorruptValueError) as info:
        decode_user("u", {b"history": b"[]", b"age": b"old"}, "k")
    assert info.value.field == "age"


def test_records_carry_the_datasets_side_features(tiny_dataset):
    first, second = tiny_dataset.interactions.user_ids[:2]
    profiles = UserProfiles.from_profiles([UserProfile(first, 30, "F", "nurse")])
    dataset = dataclasses.replace(tiny_dataset, users=profiles)
    users, items = records_from_dataset(dataset)
    records = {u.user_id: u for u in users}
    assert (records[first].age, records[first].gender, records[first].occupation) == (
        30,
        "F",
        "nurse",
    )
    assert records[second].age is None and records[second].occupation is None
    item = next(iter(items))
    row = tiny_dataset.catalog.row(1)
    assert (item.year, item.genres) == (row["year"], row["genres"])


def test_the_manifest_id_names_the_format_and_the_side_features(tiny_dataset):
    plain = load_sources(tiny_dataset).manifest_id
    assert f"format:{FORMAT}" in plain
    profiles = UserProfiles.from_profiles([UserProfile(tiny_dataset.interactions.user_ids[0], 30)])
    with_users = load_sources(dataclasses.replace(tiny_dataset, users=profiles)).manifest_id
    assert with_users != plain and "users:" in with_users
