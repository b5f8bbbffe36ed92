"""What uvicorn's event loop and HTTP parser cost: uvloop + httptools against asyncio + h11.

uvicorn's "auto" takes uvloop and httptools when they import, else asyncio and the pure-Python
h11 parser. The development environment always had both (vLLM's FastAPI pulls them in), while
the image built from the base dependencies had neither, so every other benchmark measured a
server production did not run. Both are base dependencies now; this benchmark keeps the price
of the fallback on record.

Stack: ``gateway_load``'s own (redis-server, ``tandem serve --role retrieval`` and ``--role
gateway`` as processes) with no ranker, so what is measured is the request path itself. Both
servers get ``TANDEM_SERVER_LOOP`` / ``TANDEM_SERVER_HTTP`` per arm; arms alternate, each
``--rounds`` times on a fresh stack, so drift of the shared host lands on both.

    python benchmarks/server_stack.py [--rounds 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway_load import FAST_DEADLINES, find_or_train_retriever, measure, start_stack  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
ARMS = {"uvloop + httptools": ("uvloop", "httptools"), "asyncio + h11": ("asyncio", "h11")}
KEPT = ("requests", "errors", "throughput_rps", "latency_ms")  # of each level's summary


def measure_arm(work: Path, assets, loop: str, http: str, plan: list[tuple[int, int]]) -> dict:
    """One fresh stack whose servers run ``loop`` + ``http``; ``gateway_load``'s closed-loop
    load per level."""
    stack = start_stack(
        work,
        assets,
        {"TANDEM_RANKER_BACKEND": "none", **FAST_DEADLINES},
        servers_env={"TANDEM_SERVER_LOOP": loop, "TANDEM_SERVER_HTTP": http},
    )
    try:
        levels = measure(stack, assets.users, plan, warmup=50)
        return {
            concurrency: {key: level[key] for key in KEPT} for concurrency, level in levels.items()
        }
    finally:
        stack.stop()


def mean_of(rounds: list[dict], level: str, key: str, stat: str | None = None) -> float:
    values = [r[level][key][stat] if stat else r[level][key] for r in rounds]
    return round(sum(values) / len(values), 2)


def report(results: dict) -> str:
    levels = list(results["arms"]["uvloop + httptools"][0])
    lines = [
        "# Server stack: uvloop + httptools vs asyncio + h11",
        "",
        f"`python benchmarks/server_stack.py --rounds {results['rounds']}` "
        f"({results['measured']}, {results['machine']['cpus']} CPUs). No ranker; the gateway and "
        "the retrieval service both run the arm's loop and parser; arms alternate, each on a "
        "fresh stack. Means over the rounds (each round's figures in the JSON).",
        "",
        "| concurrency | arm | requests/s | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|",
    ]
    for level in levels:
        for arm, rounds in results["arms"].items():
            errors = sum(r[level]["errors"] for r in rounds)
            lines.append(
                f"| {level} | {arm} | {mean_of(rounds, level, 'throughput_rps')} | "
                f"{mean_of(rounds, level, 'latency_ms', 'p50')} | "
                f"{mean_of(rounds, level, 'latency_ms', 'p99')} | {errors} |"
            )
    lines += ["", "Throughput, uvloop + httptools over asyncio + h11:"]
    fast, slow = results["arms"]["uvloop + httptools"], results["arms"]["asyncio + h11"]
    for level in levels:
        ratio = mean_of(fast, level, "throughput_rps") / mean_of(slow, level, "throughput_rps")
        lines.append(f"- concurrency {level}: {ratio:.2f}x")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="runs of each arm, alternating")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    args = parser.parse_args()
    plan = [(1, 50), (8, 100), (32, 200)] if args.quick else [(1, 300), (8, 800), (32, 1500)]
    arms: dict[str, list[dict]] = {name: [] for name in ARMS}
    with tempfile.TemporaryDirectory(prefix="tandem-stack-") as tmp:
        work = Path(tmp)
        assets = find_or_train_retriever(work, args.dataset)
        for round_ in range(args.rounds):
            for name, (loop, http) in ARMS.items():
                print(f"round {round_ + 1}: {name}", flush=True)
                folder = work / f"{loop}-{round_}"
                folder.mkdir()
                arms[name].append(measure_arm(folder, assets, loop, http, plan))
                print(f"  {json.dumps(arms[name][-1])}", flush=True)
    results = {
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "retriever_run": str(assets.retriever_run),
        "rounds": args.rounds,
        "plan": plan,
        "arms": arms,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "server_stack.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "server_stack.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
