"""Our RESP packing must be byte-identical to redis-py's (no server needed)."""

from __future__ import annotations

import redis

from feature_store.packed import pack


def test_packed_commands_match_redis_py_byte_for_byte():
    reference = redis.Connection()
    for args in [
        ("HSET", "tandem:x:v1:item:i1", "title", "Amélie (2001)", "embedding", b"\x00\r\n\xff"),
        ("EXPIRE", "tandem:x:v1:user:u1", 2592000),
        ("DEL", ""),
    ]:
        assert pack(args) == b"".join(reference.pack_command(*args))
