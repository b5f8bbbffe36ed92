"""Ranker speed: one-pass letter scoring vs generate(), batched throughput, peak RSS.

Model: the prepared base LLM (``tandem llm prepare``: SmolLM2-135M-Instruct), in-process
transformers backend, ``--precision auto`` (bf16 autocast where the CPU has bf16 units, else
fp32; the resolved one is recorded). Prompts: MovieLens-100K test users, LlamaRec/MLLM4Rec text
prompt (history <= 20 titles, 20 candidates A..T), built with ``ranker.prompts`` exactly as
serving builds them; ``--compact`` uses the compact prompt mode.

Measured, on the same prompts:
1. one forward pass that reads the 20 letters' log-probs (what Tandem serves), batch 1;
2. ``model.generate`` for 1 new token (the cheapest generative answer) and for a full ranking
   written out as text (``--gen-tokens``, default 40: 20 letters and separators), batch 1;
3. throughput of one-pass scoring at batch 1, 4 and 8 (micro-batched, left-padded);
4. peak resident memory of the process.
The machine's load average is recorded: on a shared CPU, numbers move with other jobs.

    python benchmarks/ranker_speed.py [--prompts 16] [--threads 2] [--compact] [--out NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ranker.backends.transformers import TransformersBackend, TransformersBackendConfig  # noqa: E402
from ranker.examples import ItemFeatures, prompt_input  # noqa: E402
from ranker.forward import resolve_precision  # noqa: E402
from ranker.llm import load_tokenizer  # noqa: E402
from ranker.prompts import PromptConfig, PromptTokenizer, render_prompt  # noqa: E402
from tandem.data import Dataset, prepare_movielens_100k  # noqa: E402
from tandem.paths import artifacts_root, dataset_dir  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def load_dataset() -> Dataset:
    folder = dataset_dir("ml-100k")
    return Dataset.load(folder) if (folder / "summary.json").is_file() else prepare_movielens_100k()


def build_prompts(tokens: PromptTokenizer, count: int, compact: bool, seed: int = 0):
    data = load_dataset()
    split = data.split()
    features = ItemFeatures.build(data.catalog)
    rng = np.random.default_rng(seed)
    config = PromptConfig.compact() if compact else PromptConfig()
    prompts = []
    for user in rng.choice(split.num_users, count, replace=False):
        history = split.test_inputs()[user]
        pool = np.setdiff1d(np.arange(1, data.catalog.num_items + 1), history)
        candidates = rng.choice(pool, 20, replace=False)
        inp = prompt_input(features, history, candidates)
        prompts.append(render_prompt(inp, config, tokens).with_soft_vectors(None))
    return prompts


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm", type=Path, default=artifacts_root() / "llm")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--gen-tokens", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument("--compact", action="store_true")
    parser.add_argument("--out", default="ranker_speed")
    args = parser.parse_args()
    args.precision = resolve_precision(args.precision)

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    tokens = PromptTokenizer(load_tokenizer(args.llm))
    prompts = build_prompts(tokens, args.prompts, args.compact)
    lengths = [len(p.token_ids) for p in prompts]
    backend = TransformersBackend(
        TransformersBackendConfig(args.llm, precision=args.precision, max_batch=8)
    )
    backend.load()
    model = backend.model
    backend.score_sync(prompts[:1])  # warm-up

    one_pass, gen_one, gen_full, agree = [], [], [], 0
    for prompt in prompts:
        one_pass.append(timed(lambda p=prompt: backend.score_sync([p])))
        ids = torch.tensor([prompt.token_ids])
        mask = torch.ones_like(ids)
        with (
            torch.inference_mode(),
            torch.autocast("cpu", torch.bfloat16, enabled=args.precision == "bf16"),
        ):
            start = time.perf_counter()
            first = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=1,
                do_sample=False,
                pad_token_id=backend._pad_id,
            )
            gen_one.append(time.perf_counter() - start)
            gen_full.append(
                timed(
                    lambda i=ids, m=mask: model.generate(
                        i,
                        attention_mask=m,
                        max_new_tokens=args.gen_tokens,
                        min_new_tokens=args.gen_tokens,
                        do_sample=False,
                        pad_token_id=backend._pad_id,
                    )
                )
            )
        scores = backend.score_sync([prompt])[0]
        agree += int(prompt.letter_token_ids[int(np.argmax(scores))] == int(first[0, -1]))

    throughput = {}
    for batch in (1, 4, 8):
        backend.config = TransformersBackendConfig(
            args.llm, precision=args.precision, max_batch=batch
        )
        seconds = timed(lambda: backend.score_sync(prompts))
        throughput[str(batch)] = {
            "prompts_per_s": round(len(prompts) / seconds, 3),
            "ms_per_prompt": round(1000 * seconds / len(prompts), 1),
        }

    median = statistics.median
    result = {
        "model": str(args.llm),
        "precision": args.precision,
        "threads": args.threads,
        "prompt_mode": "compact" if args.compact else "full",
        "prompts": len(prompts),
        "prompt_tokens_mean": round(float(np.mean(lengths)), 1),
        "one_pass_ms_median": round(1000 * median(one_pass), 1),
        "generate_1_token_ms_median": round(1000 * median(gen_one), 1),
        f"generate_{args.gen_tokens}_tokens_ms_median": round(1000 * median(gen_full), 1),
        "latency_ratio_generate_full_over_one_pass": round(median(gen_full) / median(one_pass), 2),
        "latency_ratio_generate_1_over_one_pass": round(median(gen_one) / median(one_pass), 2),
        "top_letter_agrees_with_greedy_token": f"{agree}/{len(prompts)}",
        "throughput_by_batch": throughput,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{args.out}.md").write_text(markdown(result, args.gen_tokens))
    print(json.dumps(result, indent=2))


def markdown(r: dict, gen_tokens: int) -> str:
    rows = "\n".join(
        f"| {b} | {v['prompts_per_s']} | {v['ms_per_prompt']} |"
        for b, v in r["throughput_by_batch"].items()
    )
    full_ms = r[f"generate_{gen_tokens}_tokens_ms_median"]
    ratio = r["latency_ratio_generate_full_over_one_pass"]
    return f"""# Ranker speed (one-pass letter scoring)

Protocol: `python benchmarks/ranker_speed.py` — {r["model"]}, {r["precision"]}, {r["threads"]} torch
threads, {r["prompts"]} MovieLens-100K test prompts ({r["prompt_mode"]} mode, mean
{r["prompt_tokens_mean"]} tokens, 20 candidates A..T), in-process transformers backend. The CPU is
shared with other jobs: load average {r["load_average_before"]} before, {r["load_average_after"]}
after the run ({r["cpu_count"]} cores).

| measure (batch 1, median) | ms |
|---|---|
| one pass, 20 letter log-probs | {r["one_pass_ms_median"]} |
| generate() 1 token | {r["generate_1_token_ms_median"]} |
| generate() {gen_tokens} tokens (a ranking written out) | {full_ms} |

Latency ratio generate({gen_tokens}) / one pass: **{ratio}x**;
generate(1) / one pass: {r["latency_ratio_generate_1_over_one_pass"]}x. The top letter of the
one-pass scores equals the greedy next token in {r["top_letter_agrees_with_greedy_token"]} prompts
(when it does not, greedy decoding picked a non-letter token, which letter scoring cannot do).

| batch | prompts/s | ms/prompt |
|---|---|---|
{rows}

Peak RSS: {r["peak_rss_mib"]} MiB.
"""


if __name__ == "__main__":
    main()
