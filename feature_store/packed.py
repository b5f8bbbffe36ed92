"""Bulk-write pipelines: commands packed into RESP here, sent as one buffer per batch.

redis-py packs each pipelined command in Python at several times the cost of Redis executing
it, which caps a publish far below what the server takes. For a standalone server this packs
the batch directly (what ``redis-cli --pipe`` does for mass insertion) and reads the replies
with redis-py; on a cluster, redis-py's pipeline routes each command to its slot's node.
"""

from __future__ import annotations

import redis

from feature_store.connection import SyncRedis

Arg = str | bytes | int


_HEADERS: dict[int, bytes] = {}  # bulk-string length headers, built once per length


def pack(args: tuple[Arg, ...]) -> bytes:
    """One command in RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if type(arg) is str else b"%d" % arg if type(arg) is int else arg
        header = _HEADERS.get(len(data))
        if header is None:
            header = _HEADERS[len(data)] = b"$%d\r\n" % len(data)
        out += (header, data, b"\r\n")
    return b"".join(out)


class PackedPipeline:
    """Pipelined commands on one connection of a standalone client; replies are checked."""

    def __init__(self, client: redis.Redis):
        self._client = client
        self._packed: list[bytes] = []

    def command(self, *args: Arg) -> None:
        self._packed.append(pack(args))

    def execute(self) -> None:
        """Send the batch, read every reply; raise the first error reply (after reading all)."""
        if not self._packed:
            return
        pool = self._client.connection_pool
        conn = pool.get_connection()
        errors: list[redis.ResponseError] = []
        try:
            conn.send_packed_command([b"".join(self._packed)])
            for _ in self._packed:
                try:
                    conn.read_response()
                except redis.ResponseError as exc:
                    errors.append(exc)
        except BaseException:
            conn.disconnect()  # replies may be left unread: never reuse this connection
            raise
        finally:
            pool.release(conn)
            self._packed = []
        if errors:
            raise errors[0]


class ClusterPipeline:
    """The same interface over redis-py's cluster pipeline (commands routed per slot)."""

    def __init__(self, client: redis.RedisCluster):
        self._pipe = client.pipeline(transaction=False)

    def command(self, *args: Arg) -> None:
        self._pipe.execute_command(*args)

    def execute(self) -> None:
        self._pipe.execute()


def bulk_pipeline(client: SyncRedis) -> PackedPipeline | ClusterPipeline:
    if isinstance(client, redis.RedisCluster):
        return ClusterPipeline(client)
    return PackedPipeline(client)
