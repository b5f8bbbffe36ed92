"""Key layout and value codecs of the feature store (no server needed)."""

from __future__ import annotations

import numpy as np
import pytest

from feature_store.schema import (
    CorruptValueError,
    EmbeddingCodec,
    ItemRecord,
    Keys,
    UserRecord,
    VersionSchema,
    decode_item,
    decode_user,
    encode_item,
    encode_user,
)


def _bytes(fields: dict) -> dict[bytes, bytes]:
    return {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in fields.items()}


def test_keys_follow_the_documented_layout():
    keys = Keys("prod")
    assert keys.alias == "tandem:prod:current"
    assert keys.user(3, "42") == "tandem:prod:v3:user:42"
    assert keys.item(3, "i:7") == "tandem:prod:v3:item:i:7"
    assert keys.schema(3) == "tandem:prod:v3:schema"
    assert keys.version_pattern(3) == "tandem:prod:v3:*"


@pytest.mark.parametrize("bad", ["", "a*b", "has space", "x" * 65, "-lead", "a{b}"])
def test_namespace_with_glob_or_odd_characters_is_rejected(bad):
    with pytest.raises(ValueError, match="namespace"):
        Keys(bad)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_embedding_round_trips_as_little_endian_float32_on_read(dtype):
    codec = EmbeddingCodec(4, dtype)
    vector = np.array([0.5, -1.25, 3.0, 1e-3], dtype=np.float32)
    raw = codec.encode(vector)
    assert len(raw) == codec.nbytes
    decoded = codec.decode(raw, "k")
    assert decoded.dtype == np.float32
    np.testing.assert_allclose(decoded, vector, rtol=1e-3)
    assert raw == vector.astype("<f2" if dtype == "float16" else "<f4").tobytes()


def test_embedding_with_wrong_byte_length_is_corrupt_and_names_the_key():
    codec = EmbeddingCodec(4, "float16")
    with pytest.raises(CorruptValueError, match="tandem:x:v1:item:a") as info:
        codec.decode(b"\x00" * 7, "tandem:x:v1:item:a")
    assert info.value.field == "embedding"


def test_embedding_of_the_wrong_dimension_or_not_finite_is_refused_on_write():
    codec = EmbeddingCodec(4, "float16")
    with pytest.raises(ValueError, match="shape"):
        codec.encode(np.zeros(5), "a")
    with pytest.raises(ValueError, match="finite"):
        codec.encode(np.array([1e6, 0, 0, 0]), "a")  # overflows float16


def test_user_history_is_capped_to_the_newest_items_and_round_trips():
    user = UserRecord("u1", tuple(f"i{n}" for n in range(10)), "likes noir", 8, 12.5)
    fields = encode_user(user, history_cap=3)
    decoded = decode_user("u1", _bytes(fields), "k")
    assert decoded == UserRecord("u1", ("i7", "i8", "i9"), "likes noir", 8, 12.5)


def test_user_without_preference_stores_no_preference_field():
    fields = encode_user(UserRecord("u1", ("a",), None, 0, 1.0), history_cap=5)
    assert "preference" not in fields
    assert decode_user("u1", _bytes(fields), "k").preference is None


def test_empty_history_written_by_lua_as_object_reads_as_empty():
    decoded = decode_user("u", {b"history": b"{}", b"watermark": b"0", b"updated_at": b"1"}, "k")
    assert decoded.history == ()


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({b"watermark": b"1"}, "history"),
        ({b"history": b"[1, 2]"}, "history"),
        ({b"history": b"not json"}, "history"),
        ({b"history": b"[]", b"watermark": b"x"}, "watermark"),
        ({b"history": b"[]", b"updated_at": b"nan"}, "updated_at"),
        ({b"history": b"[]", b"preference": b"\xff\xfe"}, "preference"),
    ],
)
def test_corrupt_user_fields_raise_with_the_field_name(raw, field):
    with pytest.raises(CorruptValueError) as info:
        decode_user("u", raw, "tandem:n:v1:user:u")
    assert info.value.field == field
    assert info.value.key == "tandem:n:v1:user:u"


def test_item_round_trips_with_optional_fields():
    codec = EmbeddingCodec(3, "float32")
    item = ItemRecord("i1", "Heat (1995)", "a heist", None, np.array([1, 2, 3], dtype=np.float32))
    decoded = decode_item("i1", _bytes(encode_item(item, codec)), "k", codec)
    assert decoded == item
    np.testing.assert_array_equal(decoded.embedding, item.embedding)
    bare = decode_item("i2", _bytes(encode_item(ItemRecord("i2", "T"), None)), "k", None)
    assert bare == ItemRecord("i2", "T") and bare.embedding is None


def test_item_embedding_without_a_declared_dimension_is_refused():
    with pytest.raises(ValueError, match="embedding_dim"):
        encode_item(ItemRecord("i1", "T", embedding=np.zeros(3)), None)
    with pytest.raises(CorruptValueError, match="declares none"):
        decode_item("i1", {b"title": b"T", b"embedding": b"\x00\x00"}, "k", None)


def test_item_without_title_is_corrupt():
    with pytest.raises(CorruptValueError, match="title"):
        decode_item("i1", {b"caption": b"c"}, "k", None)


def test_version_schema_round_trips_through_its_hash():
    schema = VersionSchema(7, "run-1", "complete", 64, "float32", 50, users=3, items=9)
    assert VersionSchema.from_hash(_bytes(schema.to_hash()), "k") == schema
    assert schema.codec == EmbeddingCodec(64, "float32")


def test_version_schema_of_another_format_or_garbage_is_corrupt():
    fields = VersionSchema(1, "m").to_hash()
    with pytest.raises(CorruptValueError, match="format"):
        VersionSchema.from_hash({**fields, "format": "99"}, "k")
    with pytest.raises(CorruptValueError):
        VersionSchema.from_hash({**fields, "embedding_dtype": "int8", "embedding_dim": "4"}, "k")
    with pytest.raises(CorruptValueError):
        VersionSchema.from_hash({"format": "1"}, "k")
