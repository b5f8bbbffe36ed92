"""Redis outage drill for the gateway's near-cache: do known users stay personalised?

Stack (all real, loopback, one process each): our own redis-server on a free port (never the
machine's 6379) with published features, ``tandem serve --role retrieval`` and ``tandem serve
--role gateway`` (ranker off: the drill is about the user record, and a ranker would only slow
the load). A closed-loop load of known users runs throughout: a warm-up (the near-cache fills
as it would in service), then Redis is SIGKILLed for ``--outage-s``, restarted from its RDB
dump, and a tail follows.

An answer is personalised when the retriever ran on the user's history (its timings carry a
``retrieval`` stage); the alternative during an outage is popularity. The headline,
``redis_outage.personalised_share``, counts outage answers to users who got a fresh answer in
the preceding minute (goal >= 0.9); ``personalised_share_all`` counts every outage answer.
Results go into ``benchmarks/results/fault_drill.json`` under ``redis_outage`` (the other
components' results in that file are kept) and ``benchmarks/results/redis_outage.md``.

    python benchmarks/redis_outage.py [--warmup-s 60] [--outage-s 10] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import httpx  # noqa: E402
from gateway_load import API_KEY, Assets, find_or_train_retriever, start_stack  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
SEEN_WINDOW_S = 60.0  # "users seen in the preceding minute"
SYNTHETIC_USERS = 943  # as many users as MovieLens-100K when no real retriever run exists


@dataclass
class Answer:
    started: float  # seconds since the drill began
    latency_s: float
    user_id: str
    status: int
    degraded: tuple[str, ...] = ()
    personalised: bool = False
    error: str | None = None


@dataclass
class Marks:
    kill: float = 0.0
    restart: float = 0.0
    ready: float = 0.0
    end: float = 0.0
    answers: list[Answer] = field(default_factory=list)


def drill_assets(work: Path) -> Assets:
    """The real ML-100K retriever run if one exists, else a tiny one on 943 synthetic users."""
    assets = find_or_train_retriever(work, "ml-100k")
    if len(assets.users) >= SYNTHETIC_USERS:
        return assets
    from retriever.train import TrainConfig, train_retriever
    from tandem.testing.data import synthetic_dataset
    from tandem.testing.retriever import TINY_TRAIN_OPTIONS, one_torch_thread

    root = work / "artifacts-drill"
    dataset = synthetic_dataset(num_users=SYNTHETIC_USERS, num_items=300)
    dataset.save(root / dataset.name / "data")
    config = TrainConfig(**{**TINY_TRAIN_OPTIONS, "max_epochs": 2})
    with one_torch_thread():
        run = train_retriever(dataset, config, root, progress=False)
    return Assets(root, run, dataset, list(dataset.interactions.user_ids))


async def load(url: str, users: list[str], concurrency: int, stop: asyncio.Event, begin: float):
    """Closed loop: each worker sends its next request when the previous answer is in."""
    answers: list[Answer] = []
    rng = random.Random(0)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"X-API-Key": API_KEY}
    async with httpx.AsyncClient(
        base_url=url, limits=limits, timeout=30, headers=headers
    ) as client:

        async def worker() -> None:
            while not stop.is_set():
                user = rng.choice(users)
                start = time.perf_counter()
                try:
                    response = await client.post("/recommend", json={"user_id": user, "k": 10})
                except httpx.HTTPError as exc:
                    answers.append(
                        Answer(start - begin, time.perf_counter() - start, user, 0,
                               error=type(exc).__name__)
                    )  # fmt: skip
                    continue
                body = response.json() if response.status_code == 200 else {}
                answers.append(
                    Answer(
                        start - begin,
                        time.perf_counter() - start,
                        user,
                        response.status_code,
                        tuple(body.get("degraded", ())),
                        "retrieval" in body.get("timings_ms", {}),
                    )
                )

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answers


async def drill(stack, users: list[str], warmup_s: float, outage_s: float, tail_s: float, c: int):
    marks = Marks()
    begin = time.perf_counter()
    stop = asyncio.Event()

    async def controller() -> None:
        await asyncio.sleep(warmup_s)
        marks.kill = time.perf_counter() - begin
        print(f"  kill redis at {marks.kill:.1f} s", flush=True)
        await asyncio.to_thread(stack.redis.stop, 9)
        await asyncio.sleep(outage_s)
        marks.restart = time.perf_counter() - begin
        await asyncio.to_thread(stack.redis.start, 60)
        marks.ready = time.perf_counter() - begin
        print(f"  redis back at {marks.ready:.1f} s", flush=True)
        await asyncio.sleep(tail_s)
        marks.end = time.perf_counter() - begin
        stop.set()

    marks.answers, _ = await asyncio.gather(load(stack.gateway.url, users, c, stop, begin),
                                            controller())  # fmt: skip
    return marks


def report(marks: Marks) -> dict:
    """Shares of personalised answers during the outage, overall and for recently seen users."""
    answers = sorted(marks.answers, key=lambda a: a.started)
    last_fresh: dict[str, float] = {}
    outage, seen = [], []
    for answer in answers:
        if marks.kill <= answer.started < marks.restart:
            outage.append(answer)
            fresh_at = last_fresh.get(answer.user_id)
            if fresh_at is not None and answer.started - fresh_at <= SEEN_WINDOW_S:
                seen.append(answer)
        elif answer.status == 200 and answer.personalised and not answer.degraded:
            last_fresh[answer.user_id] = answer.started + answer.latency_s
    after = [a for a in answers if a.started >= marks.restart]
    down = [a for a in after if "feature_store_unavailable" in a.degraded]
    last_down = max((a.started + a.latency_s for a in down), default=marks.restart)

    def share(group: list[Answer]) -> float | None:
        ok = sum(a.status == 200 and a.personalised for a in group)
        return round(ok / len(group), 4) if group else None

    return {
        "personalised_share": share(seen),
        "personalised_share_all": share(outage),
        "outage_requests": len(outage),
        "outage_requests_seen_users": len(seen),
        "outage_degraded": dict(Counter(r for a in outage for r in a.degraded)),
        "outage_latency_ms_p50": _p50([a.latency_s * 1000 for a in outage]),
        "requests": len(answers),
        "failed": sum(a.status != 200 for a in answers),
        "outage_s": round(marks.restart - marks.kill, 2),
        "redis_ready_s": round(marks.ready - marks.restart, 2),
        "recovery_s": round(last_down - marks.restart, 2),
    }


def markdown(result: dict) -> str:
    p = result["protocol"]
    return "\n".join(
        [
            "# Redis outage with the gateway's near-cache",
            "",
            "Protocol: " + "; ".join(f"{k}: {v}" for k, v in p.items()) + ".",
            f"Machine load average at the end: {result['loadavg_end']} (2 cores, shared).",
            "",
            "| outage answers | to users seen in the last minute | personalised (seen users) "
            "| personalised (all) | fallbacks during the outage | failed | recovery (s) |",
            "|---|---|---|---|---|---|---|",
            f"| {result['outage_requests']} | {result['outage_requests_seen_users']} "
            f"| {result['personalised_share']} | {result['personalised_share_all']} "
            f"| {result['outage_degraded']} | {result['failed']} | {result['recovery_s']} |",
            "",
            "Before the near-cache, the same outage turned every answer into popularity "
            "(`fault_drill.md`: 100% `feature_store_unavailable`). Answers from the near-cache "
            "keep the retriever's order for the user's last-read history and carry "
            "`feature_store_stale`; the ranker is skipped while the store is down (no item "
            "features). Reproduce: `python benchmarks/redis_outage.py`.",
            "",
        ]
    )


def _p50(values: list[float]) -> float | None:
    return round(sorted(values)[len(values) // 2], 2) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup-s", type=float, default=60.0)
    parser.add_argument("--outage-s", type=float, default=10.0)
    parser.add_argument("--tail-s", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--near-cache-users", type=int, default=10_000, help="0 = off (baseline)")
    args = parser.parse_args()
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tandem-redis-outage-") as tmp:
        work = Path(tmp)
        assets = drill_assets(work)
        extra = {
            "TANDEM_NEAR_CACHE_USERS": str(args.near_cache_users),
            "TANDEM_NEAR_CACHE_TTL_S": "600",
            "TANDEM_FEATURE_STORE_DEADLINE_MS": "200",
            "TANDEM_RETRIEVAL_DEADLINE_MS": "500",
            "TANDEM_DEADLINE_MS": "3000",
        }
        stack = start_stack(work, assets, {"TANDEM_RANKER_BACKEND": "none"}, extra=extra)
        try:
            subprocess.run(
                ["redis-cli", "-p", str(stack.redis.port), "SAVE"], check=True, capture_output=True
            )  # the SIGKILLed server restarts from this dump, as a persisted Redis would
            marks = asyncio.run(
                drill(stack, assets.users, args.warmup_s, args.outage_s, args.tail_s,
                      args.concurrency)
            )  # fmt: skip
        finally:
            stack.stop()
    result = report(marks)
    result["protocol"] = {
        "load": f"closed loop, {args.concurrency} workers, {len(assets.users)} known users at "
        "random, k=10, ranker off",
        "fault": f"Redis SIGKILL after a {args.warmup_s:.0f} s warm-up, restart from RDB",
        "near_cache": {"users": args.near_cache_users, "ttl_s": 600},
        "personalised": "answer retrieved from the user's history (timings carry 'retrieval')",
        "seen": f"a fresh personalised answer within the preceding {SEEN_WINDOW_S:.0f} s",
        "retriever": str(assets.retriever_run.name),
        "dataset": f"{assets.dataset.name} ({len(assets.users)} users)",
    }
    result["wall_s"] = round(time.perf_counter() - wall, 1)
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out = RESULTS / "fault_drill.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    results["redis_outage"] = result
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, sort_keys=True))
    (RESULTS / "redis_outage.md").write_text(markdown(result))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
