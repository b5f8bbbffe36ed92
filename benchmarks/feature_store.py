"""Feature store benchmark on a real local Redis: request reads and publish throughput.

Parts (``--parts``, default both):

- ``reads``: MovieLens-100K users and items (64-d float16 item embeddings) are published; then
  each simulated request reads its user record and 20 candidate item records, (a) the way the
  gateway does, one pipelined round trip per stage (2 in all), and (b) naively, one awaited
  command per key (alias, user, 20 items: 22 round trips). Requests run one at a time on one
  asyncio client; blocks of the two modes alternate so machine load hits both alike.
  Targets: pipelined >= 5x faster than naive; pipelined p99 <= 2 ms on loopback.
- ``publish``: publish throughput (keys/s, progress bars off) for MovieLens-100K (users +
  items) and for a synthetic catalog of 1M items with 64-d float16 embeddings, and Redis
  memory per item (used_memory delta, and MEMORY USAGE averaged over sampled keys).
  Target: >= 50k keys/s.

Everything runs in its own namespace (``bench-fs-<pid>``) on DB 15 of ``--redis-url`` and is
deleted afterwards. Results merge into ``benchmarks/results/feature_store.json``; the Markdown
summary beside it is rewritten from that JSON.

    python benchmarks/feature_store.py [--parts reads,publish] [--requests 3000] [--items 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import redis  # noqa: E402
from redis.utils import HIREDIS_AVAILABLE  # noqa: E402

from feature_store.client import FeatureStoreClient  # noqa: E402
from feature_store.connection import async_client  # noqa: E402
from feature_store.dataset import Records, records_from_dataset  # noqa: E402
from feature_store.schema import ItemRecord, VersionSchema, decode_item, decode_user  # noqa: E402
from feature_store.writer import FeatureWriter  # noqa: E402
from tandem.data import prepare_movielens_100k  # noqa: E402
from tandem.testing.private_redis import RedisProcess, delete_namespace  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DIM = 64
CANDIDATES = 20


def percentiles(samples: list[float]) -> dict[str, float]:
    ms = np.asarray(samples) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 4),
        "p90_ms": round(float(np.percentile(ms, 90)), 4),
        "p99_ms": round(float(np.percentile(ms, 99)), 4),
        "mean_ms": round(float(ms.mean()), 4),
        "n": len(samples),
    }


def ml100k_records(history_cap: int = 200):
    dataset = prepare_movielens_100k()
    rng = np.random.default_rng(0)
    table = rng.standard_normal((dataset.catalog.num_items + 1, DIM)).astype(np.float32)
    users, items = records_from_dataset(dataset, history_cap=history_cap, embeddings=table)
    return dataset, users, items


def synthetic_items(count: int) -> Records[ItemRecord]:
    def build():
        rng = np.random.default_rng(1)
        for start in range(0, count, 10_000):
            block = rng.standard_normal((min(10_000, count - start), DIM)).astype(np.float32)
            for offset, vector in enumerate(block):
                n = start + offset
                yield ItemRecord(f"item{n}", f"Synthetic item {n}", embedding=vector)

    return Records(count, build)


def timed_publish(writer: FeatureWriter, users, items, manifest_id: str) -> dict:
    start, cpu = time.perf_counter(), time.process_time()
    version = writer.publish(
        users, items, manifest_id=manifest_id, embedding_dim=DIM, progress=False
    )
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    keys = len(users) + len(items)
    return {
        "version": version,
        "users": len(users),
        "items": len(items),
        "keys": keys,
        "seconds": round(seconds, 3),
        "keys_per_s": round(keys / seconds),
        "publisher_cpu_s": round(cpu, 3),
        "keys_per_publisher_cpu_s": round(keys / cpu),
    }


async def naive_request(raw, keys, user_id: str, item_ids: list[str], schema: VersionSchema):
    """The same reads, one awaited command per key (what the pipeline saves)."""
    version = int(await raw.get(keys.alias))
    user_key = keys.user(version, user_id)
    user = decode_user(user_id, await raw.hgetall(user_key), user_key)
    items = {}
    for item_id in item_ids:
        key = keys.item(version, item_id)
        value = await raw.hgetall(key)
        if value:
            items[item_id] = decode_item(item_id, value, key, schema.codec)
    return user, items


async def measure_reads(url: str, namespace: str, dataset, requests: int, block: int) -> dict:
    rng = np.random.default_rng(2)
    users = dataset.interactions.user_ids
    catalog = dataset.catalog.item_ids
    plan = []
    for _ in range(requests):
        picked = rng.choice(len(catalog), CANDIDATES, replace=False)
        plan.append((users[rng.integers(len(users))], [catalog[i] for i in picked]))
    client = FeatureStoreClient(url, namespace, socket_timeout=1.0, connect_timeout=1.0)
    raw = async_client(url, socket_timeout=1.0, connect_timeout=1.0, max_connections=4,
                       pool_timeout=1.0)  # fmt: skip
    samples = {"pipelined": [], "pipelined_user": [], "pipelined_items": [], "naive": []}
    try:
        first = await client.read_user(users[0])
        schema = client._schemas[first.version]
        for user_id, item_ids in plan[:200]:  # warm-up: connections, caches, code paths
            read = await client.read_user(user_id)
            await client.read_items(read.version, item_ids)
            await naive_request(raw, client.keys, user_id, item_ids, schema)
        cpu = {"pipelined": 0.0, "naive": 0.0}
        for start in range(0, requests, block):
            c0 = time.process_time()
            for user_id, item_ids in plan[start : start + block]:
                t0 = time.perf_counter()
                read = await client.read_user(user_id)
                t1 = time.perf_counter()
                found = await client.read_items(read.version, item_ids)
                t2 = time.perf_counter()
                assert read.user is not None and len(found) == CANDIDATES
                samples["pipelined"].append(t2 - t0)
                samples["pipelined_user"].append(t1 - t0)
                samples["pipelined_items"].append(t2 - t1)
            c1 = time.process_time()
            for user_id, item_ids in plan[start : start + block]:
                t0 = time.perf_counter()
                user, found = await naive_request(raw, client.keys, user_id, item_ids, schema)
                samples["naive"].append(time.perf_counter() - t0)
                assert user is not None and len(found) == CANDIDATES
            cpu["pipelined"] += c1 - c0
            cpu["naive"] += time.process_time() - c1
    finally:
        await client.close()
        await raw.aclose()
    out = {name: percentiles(values) for name, values in samples.items()}
    for mode, seconds in cpu.items():  # client CPU per request: insensitive to machine load
        out[mode]["client_cpu_ms_per_request"] = round(seconds / requests * 1000, 4)
    out["speedup_p50"] = round(out["naive"]["p50_ms"] / out["pipelined"]["p50_ms"], 2)
    out["speedup_mean"] = round(out["naive"]["mean_ms"] / out["pipelined"]["mean_ms"], 2)
    out["targets"] = {
        "speedup_ge_5x": out["speedup_p50"] >= 5,
        "pipelined_p99_le_2ms": out["pipelined"]["p99_ms"] <= 2.0,
    }
    return out


def part_reads(url: str, namespace: str, requests: int) -> dict:
    dataset, users, items = ml100k_records()
    writer = FeatureWriter(url, namespace)
    try:
        publish = timed_publish(writer, users, items, "bench-ml100k")
    finally:
        writer.close()
    reads = asyncio.run(measure_reads(url, namespace, dataset, requests, block=100))
    reads["setup"] = {
        "dataset": "ml-100k",
        "users": publish["users"],
        "items": publish["items"],
        "embedding": f"{DIM} x float16",
        "candidates_per_request": CANDIDATES,
        "history_cap": 200,
    }
    return reads


def memory_used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def sampled_bytes(client: redis.Redis, pattern: str, sample: int = 2000) -> float:
    keys = []
    for key in client.scan_iter(match=pattern, count=1000):
        keys.append(key)
        if len(keys) >= sample:
            break
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.memory_usage(key)
    sizes = pipe.execute()
    return round(sum(sizes) / len(sizes), 1)


def part_publish(url: str, namespace: str, items: int) -> dict:
    client = redis.Redis.from_url(url)
    out = {}
    _, users, ml_items = ml100k_records()
    writer = FeatureWriter(url, namespace + "-ml")
    try:
        out["ml100k"] = timed_publish(writer, users, ml_items, "bench-ml100k")
    finally:
        writer.close()
        delete_namespace(url, namespace + "-ml")
    before = memory_used(client)
    writer = FeatureWriter(url, namespace)
    try:
        result = timed_publish(writer, Records(0, lambda: iter(())), synthetic_items(items), "1m")
        after = memory_used(client)
        pattern = f"{writer.keys.prefix}v{result['version']}:item:*"
        result["memory_bytes_per_item_used_memory_delta"] = round((after - before) / items, 1)
        result["memory_bytes_per_item_memory_usage_sampled"] = sampled_bytes(client, pattern)
        result["memory_total_mib"] = round((after - before) / 2**20, 1)
        encoding = client.object("encoding", f"{writer.keys.prefix}v{result['version']}:item:item0")
        result["hash_encoding"] = encoding.decode() if isinstance(encoding, bytes) else encoding
        out["synthetic_1m"] = result
    finally:
        writer.close()
    out["target_ge_50k_keys_per_s"] = {
        name: out[name]["keys_per_s"] >= 50_000 for name in ("ml100k", "synthetic_1m")
    }
    return out


def _met(flag: bool) -> str:
    return "met" if flag else "NOT met"


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def part_memory(items: int) -> dict:
    """Bytes per item on private servers: default hash encoding vs listpack up to 256 B values.

    A 64-d float16 embedding is 128 bytes, above Redis's default ``hash-max-listpack-value``
    (64), so item hashes use the larger hashtable encoding unless the limit is raised.
    """
    out = {"items": items}
    for label, extra in (
        ("default_config", []),
        ("hash_max_listpack_value_256", ["--hash-max-listpack-value", "256"]),
    ):
        with tempfile.TemporaryDirectory() as folder:
            server = RedisProcess(Path(folder), extra=extra).start()
            try:
                client = redis.Redis.from_url(server.url)
                before = memory_used(client)
                writer = FeatureWriter(server.url, "memory")
                result = timed_publish(
                    writer, Records(0, lambda: iter(())), synthetic_items(items), "m"
                )
                writer.close()
                key = f"tandem:memory:v{result['version']}:item:item0"
                encoding = client.object("encoding", key)
                out[label] = {
                    "bytes_per_item_used_memory_delta": round(
                        (memory_used(client) - before) / items, 1
                    ),
                    "bytes_per_item_memory_usage_sampled": sampled_bytes(
                        client, f"tandem:memory:v{result['version']}:item:*"
                    ),
                    "hash_encoding": encoding.decode() if isinstance(encoding, bytes) else encoding,
                    "keys_per_s": result["keys_per_s"],
                }
                client.close()
            finally:
                server.stop()
    return out


def write_markdown(results: dict) -> None:
    env = results.get("environment", {})
    lines = [
        "# Feature store benchmark",
        "",
        "Protocol: see the docstring of `benchmarks/feature_store.py`.",
        "",
        f"Machine: {env.get('cpus')} CPU cores shared with other engineers' jobs (see each "
        f"part's load average), Redis {env.get('redis_version')} on loopback, "
        f"redis-py {env.get('redis_py')}, Python {env.get('python')}.",
    ]
    loads = [part["context"]["load_before"] for part in results.values() if "context" in part]
    if loads and max(loads) > (env.get("cpus") or 1):
        lines += [
            "",
            f"Caveat: the load average was {min(loads)}-{max(loads)} on {env.get('cpus')} cores "
            "during these runs, so wall-clock numbers measure the CPU run queue as much as "
            "Redis. The round trips per request and the client CPU per request (or per key) "
            "do not depend on that load; rerun on an idle host to check the latency and "
            "throughput targets.",
        ]
    for key in sorted(k for k in results if k.startswith("reads")):
        lines += _reads_markdown(results[key])
    lines += _publish_markdown(results)
    (RESULTS / "feature_store.md").write_text("\n".join(lines) + "\n")


def _context_line(part: dict) -> str:
    context = part.get("context", {})
    parser = "hiredis" if context.get("hiredis_parser") else "redis-py's Python parser"
    return (
        f"Measured {context.get('measured_at')} against {context.get('redis')}, {parser}, "
        f"process nice {context.get('nice')}; load average (1 min) "
        f"{context.get('load_before')} before / {context.get('load_after')} after."
    )


def _reads_markdown(reads: dict) -> list[str]:
    count = reads["pipelined"]["n"]
    lines = [
        "",
        f"## Request reads (user + {CANDIDATES} items), {count} requests per mode, "
        f"{'hiredis' if reads['context'].get('hiredis_parser') else 'pure-Python'} parser"
        + (
            ""
            if reads["context"].get("label", "default") == "default"
            else f" ({reads['context']['label']})"
        ),
        "",
        _context_line(reads),
        "",
        _row("mode", "round trips", "p50 ms", "p90 ms", "p99 ms", "mean ms", "client CPU ms"),
        _row(*["---"] * 7),
    ]
    for name, trips, row in (
        ("pipelined (user stage)", 1, reads["pipelined_user"]),
        ("pipelined (items stage)", 1, reads["pipelined_items"]),
        ("pipelined, both stages", 2, reads["pipelined"]),
        ("naive, key by key", CANDIDATES + 2, reads["naive"]),
    ):
        cells = (row["p50_ms"], row["p90_ms"], row["p99_ms"], row["mean_ms"])
        lines.append(_row(name, trips, *cells, row.get("client_cpu_ms_per_request", "")))
    targets = reads["targets"]
    lines += [
        "",
        f"Speed-up of pipelining: {reads['speedup_p50']}x at p50, {reads['speedup_mean']}x "
        f"on the mean (target >= 5x: {_met(targets['speedup_ge_5x'])}). Pipelined p99 "
        f"{reads['pipelined']['p99_ms']} ms (target <= 2 ms: "
        f"{_met(targets['pipelined_p99_le_2ms'])}).",
    ]
    return lines


def _publish_markdown(results: dict) -> list[str]:
    lines: list[str] = []
    publish = results.get("publish")
    if publish:
        ml, big = publish["ml100k"], publish["synthetic_1m"]
        met = publish["target_ge_50k_keys_per_s"]
        lines += [
            "",
            "## Publish throughput",
            "",
            _context_line(publish),
            "",
            _row("data", "users", "items", "seconds", "keys/s", "publisher CPU s", "keys/CPU s"),
            _row(*["---"] * 7),
            _row(
                "MovieLens-100K (64-d float16 item embeddings)",
                ml["users"], ml["items"], ml["seconds"], f"{ml['keys_per_s']:,}",
                ml["publisher_cpu_s"], f"{ml['keys_per_publisher_cpu_s']:,}",
            ),
            _row(
                f"synthetic {big['items']:,} items (64-d float16)",
                0, f"{big['items']:,}", big["seconds"], f"{big['keys_per_s']:,}",
                big["publisher_cpu_s"], f"{big['keys_per_publisher_cpu_s']:,}",
            ),
            "",
            f"Target >= 50k keys/s: MovieLens-100K {_met(met['ml100k'])}, "
            f"synthetic catalog {_met(met['synthetic_1m'])}.",
            "",
            f"Redis memory per item (title + 128-byte embedding, hash encoding "
            f"`{big['hash_encoding']}`): {big['memory_bytes_per_item_used_memory_delta']} B from "
            f"the used_memory delta ({big['memory_total_mib']} MiB in all), "
            f"{big['memory_bytes_per_item_memory_usage_sampled']} B by MEMORY USAGE (sample).",
        ]  # fmt: skip
    memory = results.get("memory")
    if memory:
        lines += [
            "",
            f"## Memory per item by hash encoding ({memory['items']:,} items, private servers)",
            "",
            _context_line(memory),
            "",
            _row("server config", "encoding", "B/item (used_memory)", "B/item (MEMORY USAGE)"),
            _row(*["---"] * 4),
        ]
        for label in ("default_config", "hash_max_listpack_value_256"):
            row = memory[label]
            lines.append(
                _row(
                    label.replace("_", "-"),
                    row["hash_encoding"],
                    row["bytes_per_item_used_memory_delta"],
                    row["bytes_per_item_memory_usage_sampled"],
                )
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--parts", default="reads,publish,memory")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--memory-items", type=int, default=100_000)
    parser.add_argument(
        "--private-redis",
        action="store_true",
        help="Run reads/publish against a private redis-server this script starts (it inherits "
        "this process's nice value) instead of --redis-url.",
    )
    parser.add_argument("--label", default="", help="Suffix for the reads result key.")
    parser.add_argument(
        "--markdown-only", action="store_true", help="Rewrite the .md from the JSON and exit."
    )
    args = parser.parse_args()
    if args.markdown_only:
        write_markdown(json.loads((RESULTS / "feature_store.json").read_text()))
        return
    parts = set(args.parts.split(","))
    unknown = parts - {"reads", "publish", "memory"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}: choose from reads, publish, memory")
    namespace = f"bench-fs-{os.getpid()}"
    with tempfile.TemporaryDirectory() as folder:
        private = RedisProcess(Path(folder)).start() if args.private_redis else None
        try:
            url = private.url if private else args.redis_url
            run_parts(parts, url, namespace, args)
        finally:
            if private:
                private.stop()


def run_parts(parts: set[str], url: str, namespace: str, args: argparse.Namespace) -> None:
    client = redis.Redis.from_url(url)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "feature_store.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results["environment"] = {
        "cpus": os.cpu_count(),
        "redis_version": client.info("server")["redis_version"],
        "redis_py": redis.__version__,
        "python": platform.python_version(),
    }
    runs = {
        "reads": lambda: part_reads(url, namespace, args.requests),
        "publish": lambda: part_publish(url, namespace, args.items),
        "memory": lambda: part_memory(args.memory_items),
    }
    try:
        for name, run in runs.items():
            if name not in parts:
                continue
            context = {
                "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "load_before": round(os.getloadavg()[0], 2),
                "hiredis_parser": bool(HIREDIS_AVAILABLE),
                "nice": os.nice(0),
                "redis": "a private redis-server" if args.private_redis else url,
                "label": args.label or "default",
            }
            result = run()
            result["context"] = {**context, "load_after": round(os.getloadavg()[0], 2)}
            key = name
            if name == "reads":
                key += "_hiredis" * bool(HIREDIS_AVAILABLE) + f"_{args.label}" * bool(args.label)
            results[key] = result
            print(json.dumps({key: result}, indent=2))
    finally:
        delete_namespace(url, namespace)
        client.close()
    path.write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results)


if __name__ == "__main__":
    main()
