"""Load test of the real multi-process stack on loopback: throughput, latency, overhead, soak.

Stack: our own redis-server (features published), ``tandem serve --role retrieval`` and
``tandem serve --role gateway`` as separate processes (+ a vLLM server for the vLLM profiles).
A closed-loop asyncio + aiohttp load generator (C workers, each sending its next request when
the previous answer arrives) drives ``POST /recommend`` for known users at random.

Profiles:
- ``none``: no ranker (retriever order): the pipeline's own cost.
- ``tiny``: the tiny random Llama (+ LoRA, item and user soft tokens) in the gateway process.
- ``tiny-embedded``: the same, with the retriever in the gateway's process too (no retrieval
  service: the topology ``make run`` serves).
- ``tiny-vllm``: the same model and adapter behind a vLLM CPU server (prompt embeddings); the
  ranker is out of the gateway's process, so overhead = end-to-end minus the ranker stage is
  the gateway's own cost (target p99 <= 15 ms).
- ``soak`` / ``soak-vllm``: ``tiny`` / ``tiny-vllm`` at concurrency 8 for 5 minutes: errors
  and the gateway's RSS growth (with the ranker in its process, and without).
- ``soak-head``: the same with the shipped head ranker (``models/ranker``, what ``make run``
  serves; this revision only: older ones cannot load a head run).
- ``smollm2``/``smollm2-vllm``: SmolLM2-135M (``artifacts/llm``, from ``tandem llm prepare``)
  with the trained ranker run if one exists, in-process and behind a vLLM CPU server.
Concurrency 1, 8 and 32 for the fast profiles, 1 and 8 for SmolLM2.

Baseline: each profile first runs on the servers of an older revision (``--baseline``, by
default the request path the issue-17 review measured), exported with ``git archive`` and
fed with its own feature-store format, so old and new are compared in one run. The gateway's
event-loop lag comes from its own ``tandem_event_loop_lag_seconds`` histogram, scraped before
and after each level (``event_loop_lag_ms``; top-level ``event_loop_lag_ms_p99`` is SmolLM2 at
c=8).

The retriever is ``artifacts/<dataset>/retriever/latest`` when it exists, else a tiny one
trained on synthetic data. Everything runs on this machine, so the load generator competes
with the servers for the same CPU cores; numbers are for this machine only.

    python benchmarks/gateway_load.py [--profiles none,tiny,tiny-vllm,soak] [--quick]
                                      [--baseline REV | --baseline '']
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
from loop_lag import lag_buckets, lag_summary  # noqa: E402
from revision import BASELINE_REV, export_revision, prepare_artifacts, prepare_in  # noqa: E402

from tandem.testing.processes import (  # noqa: E402
    ServerProcess,
    free_port,
    redis_server,
    tandem_server,
)
from tandem.testing.stack import ITEM_DIM, make_tiny_ranker_run, publish_dataset  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
PROFILES = (
    "none", "tiny", "tiny-embedded", "tiny-vllm", "soak", "soak-vllm", "soak-head", "smollm2",
    "smollm2-vllm",
)  # fmt: skip
NAMESPACE = "bench"
API_KEY = "bench-key"
STAGES = ("feature_user", "retrieval", "feature_items", "prompt", "ranker", "total")
LAG_BOUND_MS = 5.0  # issue 17: event-loop lag p99 at c=8 with SmolLM2 in-process
OVERHEAD_BOUND_MS = 10.0  # issue 17: overhead p99 at c=1 with the tiny in-process ranker


# ---- load generation ----


@dataclass
class Sample:
    started: float  # seconds since the run began
    latency_s: float
    status: int
    degraded: tuple[str, ...] = ()
    timings_ms: dict[str, float] = field(default_factory=dict)
    error: str | None = None


async def run_load(
    url: str,
    users: list[str],
    concurrency: int,
    *,
    requests: int | None = None,
    duration_s: float | None = None,
    k: int = 10,
    seed: int = 0,
    timeout_s: float = 60.0,
    headers: dict[str, str] | None = None,
) -> list[Sample]:
    """Closed-loop load: ``concurrency`` workers until ``requests`` are sent or time is up."""
    rng = random.Random(seed)
    samples: list[Sample] = []
    sent = 0
    begin = time.perf_counter()

    def more() -> bool:
        if requests is not None and sent >= requests:
            return False
        return duration_s is None or time.perf_counter() - begin < duration_s

    # aiohttp: the client's own CPU time lands in every end-to-end figure, and on this shared
    # 2-core machine httpx's async stack costs a few ms per call; aiohttp's a fraction of that.
    async with aiohttp.ClientSession(
        base_url=url,
        headers=headers or {},
        connector=aiohttp.TCPConnector(limit=concurrency),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
    ) as session:

        async def worker() -> None:
            nonlocal sent
            while more():
                sent += 1
                body = {"user_id": rng.choice(users), "k": k}
                start = time.perf_counter()
                try:
                    async with session.post("/recommend", json=body) as response:
                        raw = await response.read()
                        status = response.status
                    latency = time.perf_counter() - start
                    payload = json.loads(raw) if status == 200 else {}
                    samples.append(
                        Sample(
                            start - begin,
                            latency,
                            status,
                            tuple(payload.get("degraded", ())),
                            payload.get("timings_ms", {}),
                        )
                    )
                except (aiohttp.ClientError, TimeoutError) as exc:
                    samples.append(
                        Sample(
                            start - begin, time.perf_counter() - start, 0, error=type(exc).__name__
                        )
                    )

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    array = np.asarray(values)
    return {
        "p50": round(float(np.percentile(array, 50)), 3),
        "p90": round(float(np.percentile(array, 90)), 3),
        "p99": round(float(np.percentile(array, 99)), 3),
        "mean": round(float(array.mean()), 3),
    }


def summarize(samples: list[Sample], wall_s: float) -> dict:
    ok = [s for s in samples if s.status == 200]
    e2e_ms = [s.latency_s * 1000 for s in ok]
    ranked = [s for s in ok if "ranker" in s.timings_ms]
    overhead = [s.latency_s * 1000 - s.timings_ms["ranker"] for s in ranked]
    stages = {
        stage: percentiles([s.timings_ms[stage] for s in ok if stage in s.timings_ms])
        for stage in STAGES
    }
    return {
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "error_kinds": dict(Counter(s.error or str(s.status) for s in samples if s.status != 200)),
        "throughput_rps": round(len(ok) / wall_s, 2) if wall_s > 0 else None,
        "wall_s": round(wall_s, 2),
        "latency_ms": percentiles(e2e_ms),
        "overhead_ms": percentiles(overhead),
        "stages_ms": stages,
        "degraded": dict(Counter(reason for s in ok for reason in s.degraded)),
        "ranked_share": round(len(ranked) / len(ok), 4) if ok else 0.0,
    }


RSS_EVERY_S = 15.0  # the soak's RSS trace interval


def _second_half(soak_result: dict) -> str:
    """The soak's growth over its second half, when it traced RSS (older runs did not)."""
    if "rss_growth_second_half_pct" not in soak_result:
        return ""
    return (
        f"; over the second half {soak_result['rss_growth_second_half_pct']:+.2f}% (RSS every "
        f"{soak_result['rss_trace_every_s']:.0f} s: {soak_result['rss_trace_mb']} MB)"
    )


def cpu_model() -> str:
    """The host CPU's model name: these figures move with the host, and a profile kept from an
    earlier run may have been measured on another one (sessions do not always get the same)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# ---- the stack ----


@dataclass
class Assets:
    artifacts: Path
    retriever_run: Path
    dataset: object
    users: list[str]

    @property
    def data_dir(self) -> Path:
        return self.artifacts / self.dataset.name / "data"  # type: ignore[attr-defined]


def baseline_assets(tree: Path, assets: Assets) -> Assets:
    """The baseline's own artifacts (its data format), serving the same retriever run."""
    root, run = prepare_artifacts(
        tree,
        assets.artifacts,
        assets.dataset.name,
        assets.retriever_run,  # type: ignore[attr-defined]
    )
    return Assets(root, run, assets.dataset, assets.users)


def find_or_train_retriever(work: Path, dataset_name: str) -> Assets:
    """``artifacts/<dataset>/retriever/latest``, else a tiny run trained on synthetic data."""
    from tandem.artifacts import resolve_run
    from tandem.data import Dataset

    artifacts = Path(os.environ.get("TANDEM_ARTIFACTS_DIR", REPO / "artifacts")).resolve()
    try:
        run = resolve_run(artifacts / dataset_name / "retriever")
        dataset = Dataset.load(artifacts / dataset_name / "data")
    except FileNotFoundError:
        from tandem.testing.retriever import train_tiny_run

        artifacts = work / "artifacts"
        run = train_tiny_run(artifacts)
        from retriever.core import Retriever

        name = Retriever.load(run).manifest.dataset
        dataset = Dataset.load(artifacts / name / "data")
    return Assets(artifacts, run, dataset, list(dataset.interactions.user_ids))


@dataclass
class Stack:
    redis: ServerProcess
    retrieval: ServerProcess | None  # None: the retriever runs in the gateway
    gateway: ServerProcess

    def stop(self) -> None:
        for part in (self.gateway, self.retrieval, self.redis):
            if part is not None:
                part.stop()


def start_stack(
    work: Path,
    assets: Assets,
    ranker_env: dict[str, str],
    *,
    extra: dict[str, str] | None = None,
    servers_env: dict[str, str] | None = None,
    source: Path = REPO,
    embedded_retrieval: bool = False,
) -> Stack:
    """Redis with the dataset published, then retrieval and gateway running ``source``'s code
    (``embedded_retrieval``: no retrieval service, the gateway loads the retriever itself);
    ``extra`` goes to the gateway, ``servers_env`` to both servers."""
    from retriever.core import Retriever

    started: list[ServerProcess] = []  # stopped again if a later part fails to start
    try:
        redis = redis_server(work / "redis").start()
        started.append(redis)
        redis_url = f"redis://127.0.0.1:{redis.port}/0"
        if source == REPO:
            publish_dataset(redis_url, NAMESPACE, assets.dataset, manifest_id="bench")
        else:  # an older revision reads only the feature-store format it wrote
            prepare_in(source, {
                "redis_url": redis_url, "namespace": NAMESPACE, "data": str(assets.data_dir),
            })  # fmt: skip
        Retriever.load(assets.retriever_run)  # fail here, not in a subprocess log
        common = {
            "TANDEM_ARTIFACTS_DIR": str(assets.artifacts),
            "TANDEM_RETRIEVER_RUN": str(assets.retriever_run),
            "TANDEM_LOG_LEVEL": "WARNING",
            **(servers_env or {}),
        }
        retrieval = None
        if not embedded_retrieval:
            retrieval = tandem_server(
                "retrieval", free_port(), work / "retrieval.log", common, source=source
            ).start()
            started.append(retrieval)
        gateway_env = {
            **common,
            **({"TANDEM_RETRIEVAL_URL": retrieval.url} if retrieval is not None else {}),
            "TANDEM_REDIS_URL": redis_url,
            "TANDEM_NAMESPACE": NAMESPACE,
            "TANDEM_API_KEYS": API_KEY,
            **ranker_env,
            **(extra or {}),
        }
        gateway = tandem_server(
            "gateway", free_port(), work / "gateway.log", gateway_env, source=source
        ).start()
    except BaseException:
        for part in reversed(started):
            part.stop()
        raise
    return Stack(redis, retrieval, gateway)


# ---- profiles ----


LEVEL_CAP_S = 180.0  # a concurrency level stops after this long even if requests remain


def measure(stack: Stack, users: list[str], plan: list[tuple[int, int]], warmup: int) -> dict:
    headers = {"X-API-Key": API_KEY}
    asyncio.run(run_load(stack.gateway.url, users, 2, requests=warmup, headers=headers))
    out = {}
    for concurrency, count in plan:
        lag_before = lag_buckets(stack.gateway.url)
        begin = time.perf_counter()
        samples = asyncio.run(
            run_load(
                stack.gateway.url,
                users,
                concurrency,
                requests=count,
                duration_s=LEVEL_CAP_S,
                headers=headers,
            )
        )
        out[str(concurrency)] = summarize(samples, time.perf_counter() - begin)
        out[str(concurrency)]["event_loop_lag_ms"] = lag_summary(
            lag_before, lag_buckets(stack.gateway.url), LAG_BOUND_MS
        )
        print(f"  c={concurrency}: {json.dumps(out[str(concurrency)]['latency_ms'])}", flush=True)
    return out


def soak(stack: Stack, users: list[str], duration_s: float, concurrency: int = 8) -> dict:
    headers = {"X-API-Key": API_KEY}
    asyncio.run(run_load(stack.gateway.url, users, concurrency, requests=200, headers=headers))
    pid = stack.gateway.process.pid  # type: ignore[union-attr]
    rss_start = rss_mb(pid)
    trace: list[float] = []  # RSS every RSS_EVERY_S: warm-up levels off, a leak keeps climbing

    async def load_and_trace() -> list:
        async def sample() -> None:
            while True:
                trace.append(round(rss_mb(pid), 1))
                await asyncio.sleep(RSS_EVERY_S)

        sampler = asyncio.create_task(sample())
        try:
            return await run_load(
                stack.gateway.url, users, concurrency, duration_s=duration_s, headers=headers
            )
        finally:
            sampler.cancel()

    begin = time.perf_counter()
    samples = asyncio.run(load_and_trace())
    wall = time.perf_counter() - begin
    rss_end = rss_mb(pid)
    trace.append(round(rss_end, 1))
    middle = trace[len(trace) // 2]
    summary = summarize(samples, wall)
    summary.update(
        {
            "concurrency": concurrency,
            "duration_s": duration_s,
            "rss_start_mb": round(rss_start, 1),
            "rss_end_mb": round(rss_end, 1),
            "rss_growth_pct": round(100 * (rss_end - rss_start) / rss_start, 2),
            "rss_trace_mb": trace,
            "rss_trace_every_s": RSS_EVERY_S,
            "rss_growth_second_half_pct": round(100 * (rss_end - middle) / middle, 2),
        }
    )
    return summary


def vllm_server(
    work: Path, llm: Path, adapter: Path | None, kv_cache_mb: int = 256
) -> ServerProcess:
    """A vLLM CPU server through the deployment launcher; ``rec-v1`` is the adapter if any."""
    command = [
        sys.executable, "-m", "deploy.vllm.launch", "--profile", "cpu", "--model", str(llm),
        "--port", "0", "--kv-cache-bytes", str(kv_cache_mb * 1024**2), "--max-num-seqs", "16",
    ]  # fmt: skip
    if adapter is not None:
        command += ["--lora-modules", f"rec-v1={adapter}"]
    port = free_port()
    command[command.index("--port") + 1] = str(port)
    env = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    return ServerProcess("ranker", command, port, work / f"vllm-{port}.log", env, "/health")


class Skip(Exception):
    """A profile that cannot run here (say why in the results)."""


@dataclass
class Tiny:
    llm: Path
    lora: Path
    run: Path


def tiny_models(work: Path, assets: Assets, source: Path = REPO) -> Tiny:
    """The tiny LLM, LoRA and ranker run, built once per source tree (its own run format)."""
    from retriever.core import Retriever
    from tandem.testing.tiny_llm import make_tiny_llm, make_tiny_lora

    if source != REPO:
        work = work / source.name
    tiny = Tiny(work / "tiny_llm", work / "tiny_lora", work / "ranker" / "tiny-ranker")
    if (tiny.llm / "config.json").is_file():
        return tiny
    if source != REPO:
        prepare_in(source, {"tiny": str(work), "retriever_run": str(assets.retriever_run)})
        return tiny
    llm = make_tiny_llm(tiny.llm)
    lora = make_tiny_lora(llm, tiny.lora)
    retriever = Retriever.load(assets.retriever_run)
    run = make_tiny_ranker_run(
        tiny.run, llm, lora,
        item_dim=ITEM_DIM, user_dim=retriever.dim, dataset=retriever.manifest.dataset,
    )  # fmt: skip
    return Tiny(llm, lora, run)


FAST_DEADLINES = {
    "TANDEM_DEADLINE_MS": "10000",
    "TANDEM_RANKER_DEADLINE_MS": "8000",
    "TANDEM_FEATURE_STORE_DEADLINE_MS": "1000",
    "TANDEM_RETRIEVAL_DEADLINE_MS": "2000",
}
SLOW_DEADLINES = {
    **FAST_DEADLINES,
    "TANDEM_DEADLINE_MS": "60000",
    "TANDEM_RANKER_DEADLINE_MS": "55000",
}


def run_profile(
    name: str, work: Path, assets: Assets, quick: bool, soak_s: float, source: Path = REPO
) -> dict:
    """Start the stack for profile ``name`` (servers running ``source``'s code), measure, stop;
    Skip when it cannot run here."""
    users = assets.users
    # c=1 carries the overhead bound: 1,000 requests, since the p99 of 300 is their 3rd largest
    # (blocks of 300 in one run spread over 8.2-11.4 ms for the tiny profile).
    fast_plan = [(1, 50), (8, 100), (32, 200)] if quick else [(1, 1000), (8, 800), (32, 1500)]
    slow_plan = [(1, 10), (8, 24)] if quick else [(1, 60), (8, 160)]
    folder = work / (name if source == REPO else f"{name}-baseline")
    servers: list[ServerProcess] = []
    info: dict = {
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()) + " (aiohttp)",
        "cpu": cpu_model(),
    }
    if name == "none":
        env, plan = {"TANDEM_RANKER_BACKEND": "none", **FAST_DEADLINES}, fast_plan
    elif name == "soak-head":
        if source != REPO:
            raise Skip("an older revision cannot load a head ranker run")
        shipped = REPO / "models" / "ranker"
        env, plan = {"TANDEM_RANKER_RUN": str(shipped), **FAST_DEADLINES}, fast_plan
        info["ranker_run"] = str(shipped)
    elif name in ("tiny", "tiny-embedded", "soak", "tiny-vllm", "soak-vllm"):
        tiny = tiny_models(work, assets, source)
        env = {
            "TANDEM_LLM_DIR": str(tiny.llm),
            "TANDEM_RANKER_RUN": str(tiny.run),
            **FAST_DEADLINES,
        }
        env["TANDEM_RANKER_BACKEND"] = "inprocess"
        plan = fast_plan
        if name in ("tiny-vllm", "soak-vllm"):
            servers.append(vllm_server(folder, tiny.llm, tiny.lora, kv_cache_mb=64))
            env |= {"TANDEM_RANKER_BACKEND": "vllm", "TANDEM_VLLM_ADAPTER": "rec-v1"}
    elif name in ("smollm2", "smollm2-vllm"):
        llm = assets.artifacts / "llm"
        if not (llm / "config.json").is_file():
            raise Skip(f"no {llm}: run `tandem llm prepare`")
        env = {
            "TANDEM_LLM_DIR": str(llm),
            "TANDEM_RANKER_BACKEND": "inprocess",
            "TANDEM_RANK_WEIGHT": "0.5",  # a load test: the ranker runs even if not shown to help
            **SLOW_DEADLINES,
        }
        threads = str(os.cpu_count() or 1)  # a real LLM in-process uses every core
        env |= {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        from ranker.head import is_head_run
        from tandem.artifacts import resolve_run

        run = None
        with contextlib.suppress(FileNotFoundError):  # no trained run: the base LLM zero-shot
            run = resolve_run(assets.artifacts / assets.dataset.name / "ranker")  # type: ignore[attr-defined]
        if is_head_run(run):  # a head ranker runs no LLM: this profile measures SmolLM2
            run = None
        if run is not None:
            env["TANDEM_RANKER_RUN"] = str(run)
        info["ranker_run"] = str(run) if run else "zero-shot (no trained ranker run)"
        plan = slow_plan
        if name == "smollm2-vllm":
            adapter = run / "adapter" if run is not None and (run / "adapter").is_dir() else None
            servers.append(vllm_server(folder, llm, adapter))
            env |= {
                "TANDEM_RANKER_BACKEND": "vllm",
                "TANDEM_VLLM_ADAPTER": "rec-v1" if adapter else "base",
            }
    else:
        raise Skip(f"unknown profile {name!r}")
    folder.mkdir(parents=True, exist_ok=True)
    for server in servers:
        server.start(timeout_s=600)
        env["TANDEM_VLLM_URL"] = server.url
    stack = start_stack(
        folder, assets, env, source=source, embedded_retrieval=name == "tiny-embedded"
    )
    try:
        if name in ("soak", "soak-vllm", "soak-head"):
            return {**info, **soak(stack, users, 20.0 if quick else soak_s)}
        return {**info, **measure(stack, users, plan, warmup=8 if plan is slow_plan else 50)}
    finally:
        stack.stop()
        for server in servers:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", default=",".join(PROFILES))
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--soak-s", type=float, default=300.0)
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument(
        "--baseline",
        default=BASELINE_REV,
        help="git revision whose servers run each profile first, side by side ('' for none)",
    )
    args = parser.parse_args()
    out_json = RESULTS / "gateway_load.json"
    results: dict = json.loads(out_json.read_text()) if out_json.exists() else {}
    results["machine"] = {
        "cpus": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    results["protocol"] = {
        "load": "closed loop, asyncio + aiohttp, random known users, k=10, loopback",
        "overhead": "end-to-end latency minus timings_ms.ranker, per request",
        "levels": f"fixed request counts per concurrency level, each capped at {LEVEL_CAP_S:.0f} s",
        "stack": "own redis-server + retrieval process + gateway process (+ vLLM server)",
    }
    with tempfile.TemporaryDirectory(prefix="tandem-load-") as tmp:
        work = Path(tmp)
        assets = find_or_train_retriever(work, args.dataset)
        results["retriever_run"] = str(assets.retriever_run)
        kept = results.pop("baseline", {})
        baseline = None
        if args.baseline:
            tree, commit = export_revision(args.baseline, work)
            # profiles not run now keep their baseline figures if the baseline is the same
            earlier = kept if kept.get("commit") == commit else {}
            baseline = results["baseline"] = {**earlier, "rev": args.baseline, "commit": commit}
            old_assets = baseline_assets(tree, assets)
        elif kept:  # no baseline arm this time: the earlier one's figures stay as they were
            results["baseline"] = kept
        for name in args.profiles.split(","):
            arms = [("baseline", tree, old_assets)] if baseline is not None else []
            for arm, source, arm_assets in [*arms, ("this", REPO, assets)]:
                print(f"profile {name} ({arm})", flush=True)
                target = baseline if arm == "baseline" else results
                try:
                    target[name] = run_profile(
                        name, work, arm_assets, args.quick, args.soak_s, source=source
                    )
                except Skip as exc:
                    target[name] = {"skipped": str(exc)}
    lag = results.get("smollm2", {}).get("8", {}).get("event_loop_lag_ms", {})
    results["event_loop_lag_ms_p99"] = lag.get("p99")
    results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, indent=2, sort_keys=True))
    (RESULTS / "gateway_load.md").write_text(report(results))
    print(f"wrote {out_json} and gateway_load.md")


def _fmt(stats: dict, key: str) -> str:
    value = stats.get(key)
    return "-" if value is None else f"{value:.1f}"


def report(results: dict) -> str:
    """The human-readable summary: protocol, then one table per profile."""
    lines = [
        "# Gateway load benchmark",
        "",
        "Protocol: " + "; ".join(f"{k}: {v}" for k, v in results["protocol"].items()) + ".",
        f"Machine: {results['machine']}. Retriever run: `{results.get('retriever_run')}`.",
        "Latencies in ms; overhead = end-to-end minus the ranker stage.",
        "",
    ]
    for name in ("none", "tiny", "tiny-embedded", "tiny-vllm", "smollm2", "smollm2-vllm"):
        profile = results.get(name)
        if not profile:
            continue
        lines += [f"## {name}", ""]
        if "skipped" in profile:
            lines += [f"skipped: {profile['skipped']}", ""]
            continue
        measured = profile.get("measured", "an earlier run (load generator: httpx)")
        host = f" on {profile['cpu']}" if "cpu" in profile else ""
        lines += [f"measured: {measured}{host}", ""]
        if "ranker_run" in profile:
            lines += [f"ranker run: `{profile['ranker_run']}`", ""]
        lines += [
            "| concurrency | req/s | p50 | p99 | overhead p50 | overhead p99 | ranker p50 "
            "| ranker p99 | errors | degraded |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c, row in sorted(
            ((k, v) for k, v in profile.items() if k.isdigit()), key=lambda kv: int(kv[0])
        ):
            lines.append(
                f"| {c} | {row['throughput_rps']} | {_fmt(row['latency_ms'], 'p50')} "
                f"| {_fmt(row['latency_ms'], 'p99')} | {_fmt(row['overhead_ms'], 'p50')} "
                f"| {_fmt(row['overhead_ms'], 'p99')} | {_fmt(row['stages_ms']['ranker'], 'p50')} "
                f"| {_fmt(row['stages_ms']['ranker'], 'p99')} | {row['errors']} "
                f"| {row['degraded'] or '-'} |"
            )
        lines += ["", "Per-stage p50 / p99 (ms):", ""]
        lines += ["| concurrency | " + " | ".join(STAGES) + " |", "|---" * (len(STAGES) + 1) + "|"]
        for c, row in sorted(
            ((k, v) for k, v in profile.items() if k.isdigit()), key=lambda kv: int(kv[0])
        ):
            cells = [
                f"{_fmt(row['stages_ms'][s], 'p50')} / {_fmt(row['stages_ms'][s], 'p99')}"
                for s in STAGES
            ]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += comparison_report(results)
    for soak_name in ("soak", "soak-vllm", "soak-head"):
        soak_result = results.get(soak_name)
        if not soak_result or "skipped" in soak_result:
            continue
        lines += [
            f"## {soak_name}",
            "",
            f"{soak_result['duration_s']:.0f} s at concurrency {soak_result['concurrency']}: "
            f"{soak_result['requests']} requests, {soak_result['errors']} errors, "
            f"p99 {_fmt(soak_result['latency_ms'], 'p99')} ms, gateway RSS "
            f"{soak_result['rss_start_mb']} -> {soak_result['rss_end_mb']} MB "
            f"({soak_result['rss_growth_pct']:+.2f}%; target < 10%)"
            + _second_half(soak_result)
            + ".",
            "",
        ]
    return "\n".join(lines)


def comparison_report(results: dict) -> list[str]:
    """Baseline revision vs this one, per profile and concurrency, and the issue's bounds."""
    baseline = results.get("baseline")
    lines = ["## Bounds", ""]

    def overhead(profile: str) -> float | None:
        return results.get(profile, {}).get("1", {}).get("overhead_ms", {}).get("p99")

    lag = results.get("event_loop_lag_ms_p99")
    for label, value, bound in (
        ("overhead p99, c=1, tiny in-process ranker", overhead("tiny"), OVERHEAD_BOUND_MS),
        (
            "overhead p99, c=1, tiny in-process ranker, retriever in the gateway",
            overhead("tiny-embedded"),
            OVERHEAD_BOUND_MS,
        ),
        ("event-loop lag p99, c=8, SmolLM2 in-process", lag, LAG_BOUND_MS),
    ):
        verdict = "not measured" if value is None else ("met" if value <= bound else "NOT met")
        shown = "-" if value is None else f"{value:.1f}"
        lines.append(f"- {label}: {shown} ms (bound <= {bound:.0f} ms: {verdict})")
    lines.append("")
    if not baseline:
        return lines
    lines += [
        f"## Baseline `{baseline['rev']}` ({baseline['commit'][:12]}) vs this revision",
        "",
        "Same run, same machine; each profile ran on the baseline's servers first.",
        "",
        "| profile | c | p99 before | p99 now | overhead p99 before | overhead p99 now "
        "| loop lag p99 now | errors before / now |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, before in baseline.items():
        now = results.get(name)
        if not isinstance(before, dict) or not now or "skipped" in before or "skipped" in now:
            continue
        for c in sorted((k for k in now if k.isdigit() and k in before), key=int):
            old, new = before[c], now[c]
            lag_now = new.get("event_loop_lag_ms", {})
            lines.append(
                f"| {name} | {c} | {_fmt(old['latency_ms'], 'p99')} "
                f"| {_fmt(new['latency_ms'], 'p99')} | {_fmt(old['overhead_ms'], 'p99')} "
                f"| {_fmt(new['overhead_ms'], 'p99')} | {_fmt(lag_now, 'p99')} "
                f"| {old['errors']} / {new['errors']} |"
            )
    lines.append("")
    return lines


if __name__ == "__main__":
    main()
