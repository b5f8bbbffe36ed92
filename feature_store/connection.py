"""Redis clients for the feature store: standalone or cluster, sync (offline) or async (serving).

Values are binary (embeddings), so responses are never decoded by redis-py. Serving clients
retry once without backoff (a pooled connection that died with a restarted server is replaced
at once) and leave the overall deadline to the caller.
"""

from __future__ import annotations

import os

import redis
import redis.asyncio
import redis.asyncio.cluster
from redis.backoff import NoBackoff

SyncRedis = redis.Redis | redis.RedisCluster
AsyncRedis = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster


def client_name() -> str:
    """The CLIENT SETNAME of this process's connections (the embedded server's exit hook
    tells this process's connections from other processes' by it)."""
    return f"tandem-{os.getpid()}"


def sync_client(
    url: str, *, cluster: bool = False, socket_timeout: float = 30.0, connect_timeout: float = 5.0
) -> SyncRedis:
    """A blocking client for publishing and operating (long timeouts are fine offline)."""
    options = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "client_name": client_name(),
    }
    if cluster:
        return redis.RedisCluster.from_url(url, **options)
    return redis.Redis.from_url(url, **options)


def async_client(
    url: str,
    *,
    cluster: bool = False,
    socket_timeout: float,
    connect_timeout: float,
    max_connections: int,
    pool_timeout: float,
) -> AsyncRedis:
    """A pooled asyncio client with short timeouts, for the request path."""
    options = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "retry": redis.asyncio.retry.Retry(NoBackoff(), 1),
        "client_name": client_name(),
    }
    if cluster:
        return redis.asyncio.cluster.RedisCluster.from_url(
            url, max_connections=max_connections, cluster_error_retry_attempts=1, **options
        )
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=pool_timeout, **options
    )
    return redis.asyncio.Redis(connection_pool=pool)
