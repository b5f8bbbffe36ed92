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
    """Pipelined commands on one connection of a standalone client; replies are checked.

    ``send`` returns once the batch is written, so the caller can prepare the next batch
    while Redis executes this one; ``wait`` reads every reply.
    """

    def __init__(self, client: redis.Redis):
        self._client = client
        self._packed: list[bytes] = []
        self._conn: redis.Connection | None = None

    def command(self, *args: Arg) -> None:
        self._packed.append(pack(args))

    def send(self) -> None:
        if not self._packed:
            return
        self._conn = self._client.connection_pool.get_connection()
        try:
            self._conn.send_packed_command([b"".join(self._packed)])
        except BaseException:
            self.close()
            raise

    def wait(self) -> None:
        """Read every reply; raise the first error reply (after reading all of them)."""
        if self._conn is None:
            return
        errors: list[redis.ResponseError] = []
        try:
            for _ in self._packed:
                try:
                    self._conn.read_response()
                except redis.ResponseError as exc:
                    errors.append(exc)
        except BaseException:
            self.close()
            raise
        self._client.connection_pool.release(self._conn)
        self._conn, self._packed = None, []
        if errors:
            raise errors[0]

    def execute(self) -> None:
        self.send()
        self.wait()

    def close(self) -> None:
        """Drop the connection without reading: replies may be pending, never reuse it."""
        if self._conn is not None:
            self._conn.disconnect()
            self._client.connection_pool.release(self._conn)
            self._conn = None


class ClusterPipeline:
    """The same interface over redis-py's cluster pipeline (commands routed per slot)."""

    def __init__(self, client: redis.RedisCluster):
        self._pipe = client.pipeline(transaction=False)

    def command(self, *args: Arg) -> None:
        self._pipe.execute_command(*args)

    def send(self) -> None:
        self._pipe.execute()

    def wait(self) -> None:
        return None

    def execute(self) -> None:
        self._pipe.execute()

    def close(self) -> None:
        self._pipe.reset()


def bulk_pipeline(client: SyncRedis) -> PackedPipeline | ClusterPipeline:
    if isinstance(client, redis.RedisCluster):
        return ClusterPipeline(client)
    return PackedPipeline(client)
