"""Live events on the multi-process stack: ingest rate, read-your-writes, and two crash drills.

Stack on loopback: our own redis-server (``--appendonly yes --appendfsync always``, in a temp
dir; never the machine's 6379), ``tandem serve --role retrieval`` and ``--role gateway``
(ranker off: this measures the events path, not the LLM), MovieLens-100K features published,
and a ``tandem events follow``-style worker process (a stub text generator stands in for the
LLM, so the drill measures delivery, not generation).

Phases:
1. ingest: closed-loop clients post batches of 100 events for ``--seconds``;
2. read-your-writes: for a user, take the top item of ``/recommend``, post it as an event,
   and time from the 200 of ``/events`` to a ``/recommend`` that no longer returns it
   (history items are excluded, so that answer has read the event);
3. drills under the same concurrent load: SIGKILL the follow worker and restart it, then
   SIGKILL Redis and restart it from its append-only file; clients retry a batch that got 503.

Afterwards every event id a client saw acknowledged (accepted or duplicate) must be in the
stream exactly once (``lost``, ``applied_twice``), and the worker must have applied every
stream entry exactly once. Writes ``benchmarks/results/events.json`` and ``events.md``.

    python benchmarks/events.py [--seconds 15] [--clients 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import redis as redis_client  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
NAMESPACE = "bench-events"
GROUP = "preferences"
BATCH = 100


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Process:
    """A child process on a loopback port, restartable with the same command."""

    def __init__(self, name: str, command: list[str], port: int, log: Path, env: dict):
        self.name, self.command, self.port, self.log, self.env = name, command, port, log, env
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def launch(self) -> Process:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.command, env={**os.environ, **self.env}, stdout=out,
                stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
            )  # fmt: skip
        return self

    def start(self, health: str | None = "/healthz", timeout: float = 180) -> Process:
        """Launch, then wait for ``health`` to answer 200 (None: for the TCP port)."""
        self.launch()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")
            if self._ready(health):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready in {timeout} s")

    def _ready(self, health: str | None) -> bool:
        if health is None:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2):
                    return True
            except OSError:
                return False
        try:
            url = f"http://127.0.0.1:{self.port}{health}"
            return httpx.get(url, timeout=0.5).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(30)


def prepare(work: Path, redis_url: str):
    """ML-100K (prepared here if missing), a small retriever trained once, features published."""
    from feature_store.dataset import publish_sources
    from feature_store.writer import FeatureWriter
    from retriever.train import TrainConfig, train_retriever
    from tandem.data import Dataset, prepare_movielens_100k

    data_dir = REPO / "artifacts" / "ml-100k" / "data"
    dataset = Dataset.load(data_dir) if data_dir.is_dir() else prepare_movielens_100k()
    artifacts = work / "artifacts"
    dataset.save(artifacts / dataset.name / "data")
    config = TrainConfig(max_len=20, hidden=16, layers=1, dropout=0.0, batch_size=256,
                         max_epochs=1, patience=1, max_minutes=1.0)  # fmt: skip
    run = train_retriever(dataset, config, artifacts, progress=False)
    writer = FeatureWriter(redis_url, NAMESPACE)
    try:
        publish_sources(writer, dataset)
    finally:
        writer.close()
    return artifacts, run, dataset


class Load:
    """Closed-loop ingest clients; remembers every event id acknowledged by a 200."""

    def __init__(self, url: str, users: list[str], items: list[str]):
        self.url, self.users, self.items = url, users, items
        self.pause_s = 0.0  # between a client's batches (0: as fast as the stack answers)
        self.acknowledged: set[str] = set()
        self.events = 0
        self.retries = Counter()
        self.stop = False

    def batch(self) -> list[dict]:
        return [
            {
                "event_id": uuid.uuid4().hex,
                "user_id": random.choice(self.users),
                "item_id": random.choice(self.items),
            }
            for _ in range(BATCH)
        ]

    async def client(self, http: httpx.AsyncClient) -> None:
        while not self.stop:
            body = {"events": self.batch()}
            while True:  # the same batch until it is acknowledged: a 503 recorded nothing
                try:
                    answer = await http.post(self.url + "/events", json=body, timeout=10)
                except httpx.HTTPError as exc:
                    self.retries[type(exc).__name__] += 1
                    await asyncio.sleep(0.1)
                    continue
                if answer.status_code == 200:
                    break
                self.retries[str(answer.status_code)] += 1
                await asyncio.sleep(min(float(answer.headers.get("retry-after", 1)), 0.2))
            result = answer.json()
            assert not result["rejected"], result
            self.acknowledged.update(e["event_id"] for e in body["events"])
            self.events += result["accepted"]
            await asyncio.sleep(self.pause_s)


async def ingest_rate(url: str, load: Load, clients: int, seconds: float) -> float:
    async with httpx.AsyncClient() as http:
        tasks = [asyncio.create_task(load.client(http)) for _ in range(clients)]
        start, before = time.perf_counter(), load.events
        await asyncio.sleep(seconds)
        load.stop = True
        await asyncio.gather(*tasks)
        return (load.events - before) / (time.perf_counter() - start)


async def read_your_writes(url: str, users: list[str], samples: int) -> list[float]:
    """ms from the 200 of /events to a /recommend whose answer excludes the posted item."""
    out = []
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        for user in random.sample(users, samples):
            top = (await http.post("/recommend", json={"user_id": user, "k": 10})).json()
            item = top["items"][0]["item_id"]
            event = {"event_id": uuid.uuid4().hex, "user_id": user, "item_id": item}
            assert (await http.post("/events", json={"events": [event]})).status_code == 200
            acked = time.perf_counter()
            while True:
                answer = (await http.post("/recommend", json={"user_id": user, "k": 10})).json()
                if item not in {i["item_id"] for i in answer["items"]}:
                    break
            out.append((time.perf_counter() - acked) * 1000)
    return out


async def drills(load: Load, redis, follower, clients: int, log: list[str]) -> None:
    """SIGKILL the worker and restart it, then SIGKILL Redis and restart it, under load."""
    load.stop, load.pause_s = False, 0.1  # ~1k events/s per client: the worker keeps up
    async with httpx.AsyncClient() as http:
        tasks = [asyncio.create_task(load.client(http)) for _ in range(clients)]
        await asyncio.sleep(3)
        probe = redis_client.Redis(port=redis.port)
        deadline, pending = time.monotonic() + 10, 0
        while not pending and time.monotonic() < deadline:  # kill it mid-batch
            pending = probe.xpending(f"tandem:{NAMESPACE}:events", GROUP)["pending"]
            await asyncio.sleep(0.005)
        follower.kill()
        probe.close()
        log.append(f"{time.strftime('%X')} follow worker SIGKILLed ({pending} entries in flight)")
        await asyncio.sleep(1)
        follower.launch()
        log.append(f"{time.strftime('%X')} follow worker restarted")
        await asyncio.sleep(3)
        redis.kill()
        log.append(f"{time.strftime('%X')} redis SIGKILLed (appendfsync always)")
        started = time.perf_counter()
        await asyncio.to_thread(redis.start, None, 60)
        log.append(f"{time.strftime('%X')} redis restarted from its AOF "
                   f"in {time.perf_counter() - started:.2f} s")  # fmt: skip
        await asyncio.sleep(4)
        load.stop = True
        await asyncio.gather(*tasks)


def follower_main(redis_url: str, dataset_dir: str) -> None:
    """The worker process: ``PreferenceFollower`` with a stub generator until idle."""
    from enrichment.follow import FollowConfig, PreferenceFollower
    from feature_store.event_log import EventLog
    from tandem.data import Dataset

    class Stub:
        name, completion_tokens = "stub", 0

        def generate(self, conversations):
            return [f"This user enjoys {len(c[0]['content'])} characters." for c in conversations]

        def special_tokens(self):
            return ()

    events = EventLog(redis_url, NAMESPACE)
    catalog = Dataset.load(Path(dataset_dir)).catalog
    config = FollowConfig(min_events=5, batch=200, block_ms=200, claim_idle_ms=5_000)
    follower = PreferenceFollower(events, catalog, Stub(), config)
    drain = Path(dataset_dir).parent / "drain"
    idle = {"since": None}

    def on_step(step) -> None:
        if step.delivered or events.lag(GROUP):
            idle["since"] = None
        else:
            idle["since"] = idle["since"] or time.monotonic()

    def done() -> bool:
        return drain.exists() and idle["since"] is not None and time.monotonic() - idle["since"] > 1

    follower.run(done, on_step)


def start_group(redis_url: str) -> str:
    """Create the worker's group at the stream's end (no load running); returns that id."""
    from feature_store.event_log import EventLog

    events = EventLog(redis_url, NAMESPACE)
    try:
        events.ensure_group(GROUP, "$")
        return events.last_id()
    finally:
        events.close()


def audit(redis_url: str, acknowledged: set[str], follow_from: str) -> dict:
    """Acknowledged ids vs the stream; the worker's applied count vs the entries it owed."""
    from feature_store.event_log import EventLog

    events = EventLog(redis_url, NAMESPACE)
    try:
        seen = Counter(e.event.event_id for e in events.entries() if e.event is not None)
        owed = sum(1 for _ in events.entries(start=f"({follow_from}"))
        stats, length, lag = events.stats(GROUP), events.length(), events.lag(GROUP)
    finally:
        events.close()
    return {
        "lost": sum(1 for e in acknowledged if e not in seen),
        "applied_twice": sum(1 for n in seen.values() if n > 1),
        "stream_entries": length,
        "acknowledged_events": len(acknowledged),
        "consumer_owed": owed,
        "consumer_applied": stats.get("applied", 0),
        "consumer_refreshed": stats.get("refreshed", 0),
        "consumer_lag": lag,
        "consumer_lost": max(0, owed - stats.get("applied", 0)),
        "consumer_applied_twice": max(0, stats.get("applied", 0) - owed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="ingest phase length")
    parser.add_argument("--clients", type=int, default=4, help="concurrent ingest clients")
    parser.add_argument("--samples", type=int, default=200, help="read-your-writes samples")
    parser.add_argument("--follower", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.follower:
        follower_main(*args.follower)
        return
    random.seed(0)
    work = Path(tempfile.mkdtemp(prefix="tandem-events-"))
    port = free_port()
    redis_url = f"redis://127.0.0.1:{port}/0"
    redis = Process("redis", [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(work),
        "--save", "", "--appendonly", "yes", "--appendfsync", "always",
    ], port, work / "redis.log", {})  # fmt: skip
    redis.start(health=None)
    parts: list[Process] = [redis]
    try:
        t0 = time.perf_counter()
        artifacts, run, dataset = prepare(work, redis_url)
        env = {
            "TANDEM_ARTIFACTS_DIR": str(artifacts),
            "TANDEM_RETRIEVER_RUN": str(run),
            "TANDEM_DATASET": dataset.name,
            "OMP_NUM_THREADS": "1",
        }
        serve = [sys.executable, "-m", "tandem.cli", "serve", "--role"]
        retrieval_port, gateway_port = free_port(), free_port()
        retrieval = Process("retrieval", [*serve, "retrieval", "--port", str(retrieval_port)],
                            retrieval_port, work / "retrieval.log", env).start()  # fmt: skip
        parts.append(retrieval)
        gateway = Process("gateway", [*serve, "gateway", "--port", str(gateway_port)],
                          gateway_port, work / "gateway.log", {
                              **env, "TANDEM_RETRIEVAL_URL": f"http://127.0.0.1:{retrieval_port}",
                              "TANDEM_REDIS_URL": redis_url, "TANDEM_NAMESPACE": NAMESPACE,
                              "TANDEM_RANKER_BACKEND": "none"}).start()  # fmt: skip
        parts.append(gateway)
        follower = Process("follower", [sys.executable, __file__, "--follower", redis_url,
                                        str(artifacts / dataset.name / "data")],
                           0, work / "follower.log", {})  # fmt: skip
        setup_s = time.perf_counter() - t0
        users, items = list(dataset.interactions.user_ids), dataset.catalog.item_ids
        url = gateway.url
        load = Load(url, users, items)
        rate = asyncio.run(ingest_rate(url, load, args.clients, args.seconds))
        ryw = asyncio.run(read_your_writes(url, users, args.samples))
        follow_from = start_group(redis_url)
        follower.launch()
        drill_log: list[str] = []
        asyncio.run(drills(load, redis, follower, args.clients, drill_log))
        (artifacts / dataset.name / "drain").touch()
        follower.process.wait(120)
        result = {
            "ingest_events_per_s": round(rate, 1),
            "read_your_writes_ms_p50": round(float(np.percentile(ryw, 50)), 2),
            "read_your_writes_ms_p99": round(float(np.percentile(ryw, 99)), 2),
            **audit(redis_url, load.acknowledged, follow_from),
            "retries": dict(load.retries),
            "drills": drill_log,
            "settings": {
                "batch": BATCH,
                "clients": args.clients,
                "seconds": args.seconds,
                "ryw_samples": args.samples,
                "redis": "appendonly yes, fsync always",
                "ranker": "none",
                "dataset": dataset.name,
            },
            "setup_s": round(setup_s, 1),
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "load_average": [round(x, 2) for x in os.getloadavg()],
            },
        }
    finally:
        for part in reversed(parts):
            part.kill(signal.SIGTERM)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "events.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
