"""Fault drill: stop and restart Redis, the retrieval service and the ranker under load.

Stack (all real, loopback): our own redis-server on a free port (never the machine's 6379),
``tandem serve --role retrieval``, a vLLM CPU server as the ranker (tiny random Llama + LoRA,
hybrid prompts as prompt embeddings) and ``tandem serve --role gateway`` with
``TANDEM_RANKER_BACKEND=vllm``. A closed-loop load of known users runs through the whole drill.

For each component: a baseline, then SIGKILL (a crash, not a polite stop), an outage, a
restart, and a tail. Reported per component: requests and failed requests (any non-200: the
target is 0), the fallback counts during the outage, the time the component took to come back
(process ready) and the recovery time (from the restart command until the gateway's answers no
longer carry that component's fallback).

    python benchmarks/fault_drill.py [--outage-s 10] [--concurrency 4] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import httpx  # noqa: E402
from gateway_load import (  # noqa: E402
    API_KEY,
    NAMESPACE,
    Sample,
    find_or_train_retriever,
    run_load,
)

from tandem.testing.processes import (  # noqa: E402
    ServerProcess,
    free_port,
    redis_server,
    tandem_server,
)
from tandem.testing.stack import ITEM_DIM, make_tiny_ranker_run, publish_dataset  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
REASONS = {
    "redis": ("feature_store_unavailable",),
    "retrieval": ("retrieval_unavailable",),
    "ranker": ("ranker_unavailable", "ranker_timeout"),
}


def vllm_server(work: Path, llm: Path, adapter: Path) -> ServerProcess:
    port = free_port()
    command = [
        sys.executable, "-m", "deploy.vllm.launch", "--profile", "cpu", "--model", str(llm),
        "--port", str(port), "--lora-modules", f"rec-v1={adapter}",
        "--kv-cache-bytes", str(64 * 1024**2), "--max-num-seqs", "8",
    ]  # fmt: skip
    env = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}
    return ServerProcess("ranker", command, port, work / "vllm.log", env=env, health_path="/health")


class Drill:
    def __init__(self, work: Path, quick: bool):
        from retriever.core import Retriever
        from tandem.testing.tiny_llm import make_tiny_llm, make_tiny_lora

        self.work = work
        self.assets = find_or_train_retriever(work, "ml-100k")
        retriever = Retriever.load(self.assets.retriever_run)
        llm = make_tiny_llm(work / "tiny_llm")
        lora = make_tiny_lora(llm, work / "tiny_lora")
        run = make_tiny_ranker_run(
            work / "ranker" / "tiny-ranker", llm, lora,
            item_dim=ITEM_DIM, user_dim=retriever.dim, dataset=retriever.manifest.dataset,
        )  # fmt: skip
        self.redis = redis_server(work / "redis")
        self.ranker = vllm_server(work, llm, lora)
        common = {
            "TANDEM_ARTIFACTS_DIR": str(self.assets.artifacts),
            "TANDEM_RETRIEVER_RUN": str(self.assets.retriever_run),
            "TANDEM_LOG_LEVEL": "WARNING",
        }
        self.retrieval = tandem_server("retrieval", free_port(), work / "retrieval.log", common)
        self.gateway = tandem_server(
            "gateway",
            free_port(),
            work / "gateway.log",
            {
                **common,
                "TANDEM_RETRIEVAL_URL": self.retrieval.url,
                "TANDEM_REDIS_URL": f"redis://127.0.0.1:{self.redis.port}/0",
                "TANDEM_NAMESPACE": NAMESPACE,
                "TANDEM_API_KEYS": API_KEY,
                "TANDEM_RANKER_BACKEND": "vllm",
                "TANDEM_VLLM_URL": self.ranker.url,
                "TANDEM_VLLM_ADAPTER": "rec-v1",
                "TANDEM_LLM_DIR": str(llm),
                "TANDEM_RANKER_RUN": str(run),
                "TANDEM_DEADLINE_MS": "3000",
                "TANDEM_RANKER_DEADLINE_MS": "1500",
                "TANDEM_FEATURE_STORE_DEADLINE_MS": "200",
                "TANDEM_RETRIEVAL_DEADLINE_MS": "500",
            },
        )

    def start(self) -> None:
        self.redis.start()
        publish_dataset(f"redis://127.0.0.1:{self.redis.port}/0", NAMESPACE, self.assets.dataset)
        subprocess.run(
            ["redis-cli", "-p", str(self.redis.port), "SAVE"], check=True, capture_output=True
        )  # a crash (SIGKILL) must not lose the features: the restart loads this dump
        self.retrieval.start()
        self.ranker.start(timeout_s=600)
        self.gateway.start()

    def stop(self) -> None:
        for part in (self.gateway, self.ranker, self.retrieval, self.redis):
            part.stop()

    def part(self, name: str) -> ServerProcess:
        return {"redis": self.redis, "retrieval": self.retrieval, "ranker": self.ranker}[name]


def phase_report(samples: list[Sample], name: str, marks: dict[str, float]) -> dict:
    """Per-phase counts and the recovery time for component ``name``."""
    reasons = REASONS[name]

    def window(a: float, b: float) -> list[Sample]:
        return [s for s in samples if a <= s.started < b]

    outage = window(marks["kill"], marks["restart"])
    after = window(marks["restart"], marks["end"])
    hit = [s for s in after if any(r in s.degraded for r in reasons)]
    last_degraded = max((s.started + s.latency_s for s in hit), default=marks["restart"])
    during = window(marks["start"], marks["end"])
    return {
        "requests": len(during),
        "failed": sum(1 for s in during if s.status != 200),
        "failures": dict(Counter(s.error or str(s.status) for s in during if s.status != 200)),
        "outage_s": round(marks["restart"] - marks["kill"], 2),
        "outage_requests": len(outage),
        "outage_degraded": dict(Counter(r for s in outage for r in s.degraded)),
        "component_ready_s": round(marks["ready"] - marks["restart"], 2),
        "recovery_s": round(last_degraded - marks["restart"], 2),
        "degraded_after_restart": len(hit),
    }


async def drill(d: Drill, components: list[str], outage_s: float, settle_s: float, c: int) -> dict:
    users = d.assets.users
    marks: dict[str, dict[str, float]] = {}
    begin = time.perf_counter()
    now = lambda: time.perf_counter() - begin  # noqa: E731
    total = len(components) * (2 * settle_s + outage_s + 60) + 600
    stop = asyncio.Event()

    async def controller() -> None:
        for name in components:
            part = d.part(name)
            m = marks.setdefault(name, {"start": now()})
            await asyncio.sleep(settle_s)
            m["kill"] = now()
            print(f"  kill {name}", flush=True)
            await asyncio.to_thread(part.stop, 9)
            await asyncio.sleep(outage_s)
            m["restart"] = now()
            print(f"  restart {name}", flush=True)
            await asyncio.to_thread(part.start, 600)
            m["ready"] = now()
            await asyncio.sleep(settle_s)
            m["end"] = now()
        stop.set()

    async def load() -> list[Sample]:
        samples: list[Sample] = []
        while not stop.is_set():
            batch = await run_load(
                d.gateway.url, users, c, duration_s=1.0, headers={"X-API-Key": API_KEY},
                seed=len(samples), timeout_s=30,
            )  # fmt: skip
            offset = now() - 1.0
            for s in batch:
                s.started += offset
            samples.extend(batch)
            if now() > total:
                break
        return samples

    samples, _ = await asyncio.gather(load(), controller())
    return {name: phase_report(samples, name, marks[name]) for name in components}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--components", default="redis,retrieval,ranker")
    parser.add_argument("--outage-s", type=float, default=10.0)
    parser.add_argument("--settle-s", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    settle = 4.0 if args.quick else args.settle_s
    outage = 4.0 if args.quick else args.outage_s
    with tempfile.TemporaryDirectory(prefix="tandem-drill-") as tmp:
        d = Drill(Path(tmp), args.quick)
        try:
            d.start()
            ok = httpx.post(
                d.gateway.url + "/recommend", json={"user_id": d.assets.users[0]},
                headers={"X-API-Key": API_KEY}, timeout=30,
            )  # fmt: skip
            print("first answer:", ok.status_code, ok.json().get("degraded"), flush=True)
            components = asyncio.run(
                drill(d, args.components.split(","), outage, settle, args.concurrency)
            )
        finally:
            d.stop()
    results = {
        "protocol": {
            "load": f"closed loop, {args.concurrency} workers, random known users, k=10",
            "fault": "SIGKILL, outage, restart (same port); Redis restarts from an RDB dump",
            "outage_s": outage,
            "settle_s": settle,
            "ranker": "vLLM CPU server, tiny random Llama + LoRA, hybrid prompt embeddings",
            "recovery_s": "restart command -> last answer carrying the component's fallback",
        },
        "components": components,
        "failed_total": sum(r["failed"] for r in components.values()),
    }
    results["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "fault_drill.json"
    previous = json.loads(out.read_text()) if out.is_file() else {}
    if "redis_outage" in previous:  # written by benchmarks/redis_outage.py (near-cache drill)
        results["redis_outage"] = previous["redis_outage"]
    out.write_text(json.dumps(results, indent=2, sort_keys=True))
    (RESULTS / "fault_drill.md").write_text(report(results))
    print(json.dumps(results, indent=2))


def report(results: dict) -> str:
    lines = [
        "# Fault drill",
        "",
        "Protocol: " + "; ".join(f"{k}: {v}" for k, v in results["protocol"].items()) + ".",
        f"Machine load average at the end: {results.get('loadavg_end')} (2 cores, shared).",
        "",
        "| component | requests | failed | outage requests | fallbacks during outage "
        "| component ready after restart (s) | recovery (s) | gateway lag after ready (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results["components"].items():
        lag = max(0.0, row["recovery_s"] - row["component_ready_s"])
        lines.append(
            f"| {name} | {row['requests']} | {row['failed']} | {row['outage_requests']} "
            f"| {row['outage_degraded'] or '-'} | {row['component_ready_s']} "
            f"| {row['recovery_s']} | {lag:.2f} |"
        )
    lines += [
        "",
        f"Failed requests in total: {results['failed_total']} (target 0).",
        "",
        "Recovery cannot be shorter than the component's own restart (process start, model "
        "load; the vLLM CPU server took most of the ranker's time on this busy machine). The "
        "last column is the gateway's share: Redis connections are re-made on the next read, "
        "the retrieval client reconnects at once, and the vLLM client's circuit breaker lets a "
        "probe through after its cool-down.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
