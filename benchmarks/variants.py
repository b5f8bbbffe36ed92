"""Ranker variants: how exact the user split is, what a shadow costs the served path, and
whether a promote under load fails any request.

Stack (real, loopback): our own redis-server (features published), ``tandem serve --role
retrieval`` and two ``tandem serve --role gateway`` processes sharing the split in Redis. The
models are the test fixtures (``tandem.testing``): the tiny retriever trained on synthetic data
and the tiny random Llama + LoRA ranker, in each gateway's process. Variants:

- ``control`` (90%, fusion weight 0.5) and ``canary`` (10%, weight 0.8): the same ranker;
- ``plain`` (0%): retriever order, no ranker (serves the low-noise shadow measurement);
- ``shadow``: a second copy of the ranker run (its own backend and worker thread, as a separate
  ranker would be), fusion weight 1.0, scored off the response path, concurrency 2, 2 s deadline;
- ``echo`` (0%): no ranker; as a shadow it exercises the shadow machinery alone.

Keys:
- ``split_error_max``: the largest gap between a configured and the observed share over 10k
  user ids, for several splits (the gateway's own assignment function). Bound: <= 0.02.
- ``shadow_added_latency_ms_p99``: end-to-end p99 of /recommend with the LLM shadow on minus
  with no shadow, in the same gateway process: the split in Redis switches between three arms
  (no shadow; the LLM shadow; a model-free shadow, ``echo``, that isolates the gateway's own
  shadow machinery) in blocks whose order rotates, each arm of a block replaying the same
  users, one request at a time with a gap between requests. Bound: <= 2 ms. The key is
  measured with every user served by ``plain`` (retriever order: the gateway's own path, whose
  latency varies least on a shared host); ``shadow.control`` repeats it with the tiny LLM
  serving in-process. The LLM shadow runs in the gateway's process here, so its forward passes
  share this host's cores with the served path (its forward and prompt threads run at nice 19,
  as every in-process shadow does, and yield the cores); ``added_p99_ms.machinery`` is the cost
  of the shadow machinery itself (what a shadow on a separate ranker server costs, minus the
  HTTP call). Every difference comes with a 95% bootstrap interval: host noise is reported,
  not hidden.
- ``switch_failed_requests``: non-200 answers or transport errors while ``promote canary`` and
  then ``rollback`` run under a closed-loop load on both gateways. Bound: 0. Also reported: how
  long each gateway took to serve the new split (poll interval 0.5 s; bound 5 s).

Everything shares this machine's CPU cores, the load generator too.

    python benchmarks/variants.py [--blocks 6] [--block 50] [--gap-ms 25] [--served plain]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from gateway_load import (  # noqa: E402
    API_KEY,
    FAST_DEADLINES,
    NAMESPACE,
    Assets,
    Stack,
    percentiles,
    start_stack,
    tiny_models,
)

from feature_store.splits import Split, SplitStore, SplitVariant  # noqa: E402
from services.common.variants import VariantsConfig  # noqa: E402
from tandem.testing.processes import ServerProcess, free_port, tandem_server  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
SPLITS = ((0.5, 0.5), (0.9, 0.1), (0.7, 0.2, 0.1), (0.34, 0.33, 0.33), (0.99, 0.01))
HEADERS = {"X-API-Key": API_KEY}
CONFIG = {
    "salt": "bench",
    "variants": [
        {"name": "control", "share": 0.9, "control": True, "rank_weight": 0.5},
        {"name": "canary", "share": 0.1, "rank_weight": 0.8},
        {
            "name": "shadow",
            "shadow": True,
            "rank_weight": 1.0,
            "concurrency": 2,
            "deadline_ms": 2000,
        },
        {"name": "echo", "rank_weight": 0.0, "concurrency": 2, "deadline_ms": 2000},
        {"name": "plain", "rank_weight": 0.0},
    ],
}


# ---- the split ----


def split_errors(users: int = 10_000) -> dict:
    """Configured vs observed shares over ``users`` ids, per split (the gateway's assign)."""
    ids = [str(n) for n in range(1, users + 1)]
    out = {}
    for shares in SPLITS:
        names = [f"v{i}" for i in range(len(shares))]
        split = Split(
            salt="bench",
            control=names[0],
            variants=tuple(
                SplitVariant(name=n, share=s) for n, s in zip(names, shares, strict=True)
            ),
        )
        assigned = [split.assign(u) for u in ids]
        observed = [assigned.count(n) / users for n in names]
        gap = max(abs(o - s) for o, s in zip(observed, shares, strict=True))
        out["/".join(map(str, shares))] = {
            "observed": [round(o, 4) for o in observed],
            "max_gap": round(gap, 4),
        }
    return out


# ---- the stack ----


def tiny_assets(work: Path) -> Assets:
    from retriever.core import Retriever
    from tandem.data import Dataset
    from tandem.testing.retriever import train_tiny_run

    artifacts = work / "artifacts"
    run = train_tiny_run(artifacts)
    dataset = Dataset.load(artifacts / Retriever.load(run).manifest.dataset / "data")
    return Assets(artifacts, run, dataset, list(dataset.interactions.user_ids))


def start(work: Path, assets: Assets) -> tuple[Stack, ServerProcess]:
    tiny = tiny_models(work, assets)
    shadow_run = work / "ranker" / "tiny-ranker-shadow"
    shutil.copytree(tiny.run, shadow_run)
    config = json.loads(json.dumps(CONFIG))
    config["variants"][2]["run"] = str(shadow_run)
    VariantsConfig.model_validate(config)  # fail here, not in a subprocess log
    env = {
        "TANDEM_RANKER_BACKEND": "inprocess",
        "TANDEM_RANKER_RUN": str(tiny.run),
        "TANDEM_LLM_DIR": str(tiny.llm),
        "TANDEM_VARIANTS": json.dumps(config),
        "TANDEM_VARIANTS_POLL_S": "0.5",
        **FAST_DEADLINES,
    }
    stack = start_stack(work, assets, env)
    second = tandem_server("gateway", free_port(), work / "gateway2.log", stack.gateway.env)
    return stack, second.start()


def configured(stack: Stack) -> Split:
    return VariantsConfig.model_validate_json(stack.gateway.env["TANDEM_VARIANTS"]).split()


def store_of(stack: Stack) -> SplitStore:
    return SplitStore.connect(f"redis://127.0.0.1:{stack.redis.port}/0", NAMESPACE, timeout_s=5.0)


async def serving_version(client: httpx.AsyncClient, version: int, timeout_s: float = 10) -> None:
    """Wait until the gateway reports serving split ``version`` (its metrics gauge)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = (await client.get("/metrics")).text
        for line in text.splitlines():
            if (
                line.startswith("tandem_variant_split_version ")
                and float(line.split()[1]) == version
            ):
                return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"gateway did not serve split v{version} within {timeout_s} s")


def metric_sum(text: str, prefix: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


# ---- a shadow's cost ----

ARMS = ("none", "model", "machinery")  # which shadow is on: none, the LLM one, the model-free one


def with_shadow(split: Split, name: str | None) -> Split:
    """``split`` with only ``name`` as a shadow (None: no shadow); the others serve nothing."""
    return split.model_copy(
        update={
            "variants": tuple(
                v.model_copy(update={"shadow": v.name == name}) for v in split.variants
            )
        }
    )


async def shadow_cost(
    url: str,
    store: SplitStore,
    users: list[str],
    served: str,
    blocks: int,
    block: int,
    gap_s: float,
) -> dict:
    """The three arms with every user served by the variant ``served``."""
    base = store.read().active.promoted(served)  # type: ignore[union-attr]
    splits = {
        "none": with_shadow(base, None),
        "model": with_shadow(base, "shadow"),
        "machinery": with_shadow(base, "echo"),
    }
    latency: dict[str, list[float]] = {arm: [] for arm in ARMS}
    server: dict[str, list[float]] = {arm: [] for arm in ARMS}
    failed = 0
    rng = np.random.default_rng(0)
    async with httpx.AsyncClient(base_url=url, headers=HEADERS, timeout=30) as client:
        before = (await client.get("/metrics")).text
        for n in range(blocks):
            replay = [str(u) for u in rng.choice(users, size=block)]
            shift = n % len(ARMS)
            for arm in (ARMS[shift:] + ARMS[:shift])[:: 1 if n % 2 == 0 else -1]:
                active = await asyncio.to_thread(store.activate, splits[arm], f"bench: {arm}")
                await serving_version(client, active.version)
                for user in replay:
                    start = time.perf_counter()
                    response = await client.post("/recommend", json={"user_id": user, "k": 10})
                    elapsed = time.perf_counter() - start
                    if response.status_code != 200:
                        failed += 1
                    else:
                        latency[arm].append(elapsed * 1000)
                        server[arm].append(response.json()["timings_ms"]["total"])
                    await asyncio.sleep(gap_s)
                await asyncio.sleep(2.2)  # this arm's shadows finish (deadline 2 s)
        text = (await client.get("/metrics")).text
    p = {arm: percentiles(v) for arm, v in latency.items()}
    return {
        "added_p99_ms": {arm: round(p[arm]["p99"] - p["none"]["p99"], 3) for arm in ARMS[1:]},
        "added_p99_ms_ci95": {
            arm: added_p99_interval(latency[arm], latency["none"]) for arm in ARMS[1:]
        },
        "added_p50_ms": {arm: round(p[arm]["p50"] - p["none"]["p50"], 3) for arm in ARMS[1:]},
        "latency_ms": p,
        "server_total_ms": {arm: percentiles(v) for arm, v in server.items()},
        "requests_per_arm": {arm: len(v) for arm, v in latency.items()},
        "failed_requests": failed,
        "shadows": {name: shadow_stats(text, before, name) for name in ("shadow", "echo")},
    }


def added_p99_interval(arm: list[float], none: list[float], resamples: int = 2000) -> list[float]:
    """95% bootstrap interval of p99(arm) - p99(none): how much of the difference is host noise."""
    rng = np.random.default_rng(0)
    a, b = np.asarray(arm), np.asarray(none)
    diffs = [
        np.percentile(rng.choice(a, a.size), 99) - np.percentile(rng.choice(b, b.size), 99)
        for _ in range(resamples)
    ]
    return [round(float(x), 3) for x in np.percentile(diffs, [2.5, 97.5])]


def shadow_stats(text: str, before: str, name: str) -> dict:
    """A shadow's counts by result, mean Kendall tau vs served and mean latency between two
    reads of the gateway's metrics."""

    def grown(prefix: str) -> float:
        return metric_sum(text, prefix) - metric_sum(before, prefix)

    results = ("scored", "skipped", "timeout", "error")
    where = f'{{variant="{name}"}}'
    tau_sum = grown(f"tandem_shadow_kendall_tau_sum{where}")
    tau_n = grown(f"tandem_shadow_kendall_tau_count{where}")
    dur_sum = grown(f"tandem_shadow_duration_seconds_sum{where}")
    dur_n = grown(f"tandem_shadow_duration_seconds_count{where}")
    return {
        "results": {
            r: int(grown(f'tandem_shadow_requests_total{{result="{r}",variant="{name}"}}'))
            for r in results
        },
        "kendall_tau_mean": round(tau_sum / tau_n, 3) if tau_n else None,
        "latency_ms_mean": round(1000 * dur_sum / dur_n, 2) if dur_n else None,
    }


# ---- a promote under load ----


@dataclass
class Answer:
    gateway: int
    user: str
    started: float
    ok: bool
    variant: str | None


async def switch_under_load(
    urls: list[str], store: SplitStore, users: list[str], per_gateway: int
) -> dict:
    answers: list[Answer] = []
    stop = asyncio.Event()
    rng = np.random.default_rng(1)

    async def worker(client: httpx.AsyncClient, gateway: int) -> None:
        while not stop.is_set():
            user = str(rng.choice(users))
            started = time.monotonic()
            try:
                response = await client.post("/recommend", json={"user_id": user, "k": 10})
                ok = response.status_code == 200
                variant = response.json()["model"]["variant"] if ok else None
            except httpx.HTTPError:
                ok, variant = False, None
            answers.append(Answer(gateway, user, started, ok, variant))

    clients = [httpx.AsyncClient(base_url=u, headers=HEADERS, timeout=30) for u in urls]
    configured = store.read().active  # type: ignore[union-attr]
    try:
        tasks = [
            asyncio.create_task(worker(c, g))
            for g, c in enumerate(clients)
            for _ in range(per_gateway)
        ]
        await asyncio.sleep(2.0)
        promoted_at = time.monotonic()
        await asyncio.to_thread(store.promote, "canary")
        await asyncio.sleep(6.0)
        rolled_back_at = time.monotonic()
        await asyncio.to_thread(store.rollback)
        await asyncio.sleep(6.0)
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        for client in clients:
            await client.aclose()

    def pickup(since: float, until: float, expected) -> list[float | None]:
        """Per gateway: seconds from the change until every later answer follows it."""
        out: list[float | None] = []
        for g in range(len(urls)):
            window = sorted(
                (a for a in answers if a.gateway == g and since <= a.started < until and a.ok),
                key=lambda a: a.started,
            )
            stale = [i for i, a in enumerate(window) if a.variant != expected(a.user)]
            first_good = stale[-1] + 1 if stale else 0
            out.append(
                round(window[first_good].started - since, 3) if first_good < len(window) else None
            )
        return out

    return {
        "requests": len(answers),
        "failed_requests": sum(not a.ok for a in answers),
        "gateways": len(urls),
        "concurrency_per_gateway": per_gateway,
        "promote_pickup_s": pickup(promoted_at, rolled_back_at, lambda _: "canary"),
        "rollback_pickup_s": pickup(rolled_back_at, float("inf"), configured.assign),
    }


# ---- main ----


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=6, help="blocks of all three arms")
    parser.add_argument("--block", type=int, default=50, help="requests per arm and block")
    parser.add_argument("--gap-ms", type=float, default=25.0, help="pause between requests")
    parser.add_argument("--per-gateway", type=int, default=2, help="switch load workers each")
    parser.add_argument(
        "--served",
        default="plain,control",
        help="variants serving the shadow measurement ('plain' gives the key)",
    )
    args = parser.parse_args()
    out_json = RESULTS / "variants.json"
    results: dict = json.loads(out_json.read_text()) if out_json.exists() else {}
    started = time.time()
    results["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    results["command"] = "python benchmarks/variants.py " + " ".join(sys.argv[1:])
    split = split_errors()
    results["split"] = split
    results["split_error_max"] = max(s["max_gap"] for s in split.values())
    print(f"split_error_max {results['split_error_max']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="tandem-variants-") as tmp:
        work = Path(tmp)
        assets = tiny_assets(work)
        stack, second = start(work, assets)
        store = store_of(stack)
        try:
            shadow = {
                served: asyncio.run(
                    shadow_cost(
                        stack.gateway.url,
                        store,
                        assets.users,
                        served,
                        args.blocks,
                        args.block,
                        args.gap_ms / 1000,
                    )
                )
                for served in args.served.split(",")
            }
            results["shadow"] = shadow
            results["shadow_added_latency_ms_p99"] = shadow["plain"]["added_p99_ms"]["model"]
            for served, arms in shadow.items():
                print(f"served by {served}: shadow added p99 ms {arms['added_p99_ms']}")
            store.activate(configured(stack), "bench: configured")  # undo the shadow toggles
            switch = asyncio.run(
                switch_under_load(
                    [stack.gateway.url, second.url], store, assets.users, args.per_gateway
                )
            )
            results["switch"] = switch
            results["switch_failed_requests"] = switch["failed_requests"]
            print(f"switch_failed_requests {switch['failed_requests']}", flush=True)
        finally:
            store.close()
            second.stop()
            stack.stop()
    results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["wall_s"] = round(time.time() - started, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (RESULTS / "variants.md").write_text(report(results))
    print(f"wrote {out_json} and variants.md")


def shadow_table(served: str, s: dict) -> list[str]:
    return [
        f"Served by `{served}`:",
        "",
        "| arm | requests | p50 ms | p99 ms | added p50 ms | added p99 ms (95% CI) "
        "| server total p99 ms |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {arm} | {s['requests_per_arm'][arm]} | {s['latency_ms'][arm]['p50']} | "
            f"{s['latency_ms'][arm]['p99']} | {s['added_p50_ms'].get(arm, '-')} | "
            f"{s['added_p99_ms'].get(arm, '-')} {s['added_p99_ms_ci95'].get(arm, '')} | "
            f"{s['server_total_ms'][arm]['p99']} |"
            for arm in ARMS
        ),
        "",
        *(
            f"Shadow `{name}`: {v['results']}; mean Kendall tau vs served "
            f"{v['kendall_tau_mean']}; mean latency {v['latency_ms_mean']} ms."
            for name, v in s["shadows"].items()
        ),
        f"Failed requests: {s['failed_requests']}.",
        "",
    ]


def report(r: dict) -> str:
    s, w = r["shadow"], r["switch"]
    lines = [
        "# Ranker variants",
        "",
        f"`{r['command']}` on {r['machine']['cpus']} CPUs (load average "
        f"{r['machine']['loadavg_start']} -> {r['machine']['loadavg_end']}), {r['wall_s']} s.",
        "Models: the test fixtures (tiny retriever on synthetic data, tiny random Llama + LoRA "
        "in each gateway process). See the docstring of benchmarks/variants.py for the protocol.",
        "",
        "| key | value | bound |",
        "|---|---|---|",
        f"| `split_error_max` | {r['split_error_max']} | <= 0.02 |",
        f"| `shadow_added_latency_ms_p99` | {r['shadow_added_latency_ms_p99']} | <= 2 |",
        f"| `switch_failed_requests` | {r['switch_failed_requests']} | 0 |",
        "",
        "## Split (10k user ids)",
        "",
        "| configured | observed | max gap |",
        "|---|---|---|",
        *(f"| {k} | {v['observed']} | {v['max_gap']} |" for k, v in r["split"].items()),
        "",
        "## A shadow on the served path (one gateway, arms in rotating blocks)",
        "",
        "Arms: `none` (no shadow), `model` (the tiny LLM shadow, in the gateway's process: "
        "its forward passes share this host's CPU cores with the served ones, from threads at "
        "the lowest OS priority, nice 19), "
        "`machinery` (a model-free shadow: scheduling, prompt input, Kendall tau, metrics; "
        "what a shadow served by a separate ranker server costs the gateway, minus the HTTP "
        "call). Added = the arm's percentile minus `none`'s; the interval is a 95% bootstrap. "
        "Served by `plain` (retriever order: the gateway's own path, the least noisy; the key) "
        "and by `control` (the tiny LLM in-process, weight 0.5).",
        "",
        *(line for served, arms in s.items() for line in shadow_table(served, arms)),
        "## Promote and rollback under load",
        "",
        f"{w['requests']} requests on {w['gateways']} gateways ({w['concurrency_per_gateway']} "
        f"workers each), {w['failed_requests']} failed. Seconds until each gateway served the "
        f"new split: promote {w['promote_pickup_s']}, rollback {w['rollback_pickup_s']} "
        "(poll interval 0.5 s).",
        "",
    ]
    if "attribution" in r:
        lines += ["Attribution: see the `attribution` key of variants.json.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
