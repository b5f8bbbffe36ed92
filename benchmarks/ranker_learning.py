"""Can the ranker learn on this CPU? Sanity tasks, then the real-data learning curve.

1. Synthetic tasks (``ranker.synthetic``) through the real training code — the served LLM
   (``--llm``, e.g. the 2-layer SmolLM2 copy), projectors with letter anchors, the pointer
   prompt and the losses — each for a wall-clock budget: examples seen, minutes and held-out
   accuracy among 20 candidates (chance 0.05).
2. The real-data run's validation curve (``--run``, read from its ``train_log.jsonl``): examples
   seen against validation loss (chance ln 20 = 3.00), NDCG@10 of the ranker alone and fused,
   and the Spearman correlation to the retriever's order (how well it reproduces its teacher).

Writes ``benchmarks/results/ranker_learning.{json,md}``. Run it with nothing else on the CPU.

    python benchmarks/ranker_learning.py --llm artifacts/llm-2 --run RUN_DIR
        [--tasks point:4,match:8,recent:4] [--aux 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ranker.prompts import PromptConfig  # noqa: E402
from ranker.synthetic import SyntheticConfig, train_synthetic  # noqa: E402
from ranker.train import LOG_FILE, TrainConfig  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def synthetic_config(
    minutes: float, aux: float, threads: int, decay_examples: int = 0, relative: bool = False
) -> TrainConfig:
    return TrainConfig(
        prompt=PromptConfig.pointer(relative_signals=relative),
        lr=1e-3,
        projector_lr=2e-3,
        warmup_steps=10,
        decay_examples=decay_examples,
        batch_size=32,
        max_steps=10**6,
        max_minutes=minutes,
        precision="fp32",
        threads=threads,
        eval_every=50,
        lora_dropout=0.0,
        aux_weight=aux,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
    )


def real_curve(run: Path) -> list[dict]:
    keys = ("examples", "valid_loss", "valid_ndcg@10", "valid_fused_ndcg@10", "rank_weight",
            "valid_retriever_order_ndcg@10", "valid_spearman_to_retriever")  # fmt: skip
    rows = [json.loads(line) for line in (run / LOG_FILE).read_text().splitlines()]
    seconds = {r["step"]: r["seconds"] for r in rows if "loss" in r}
    return [
        {
            "step": r["step"],
            "minutes": round(seconds.get(r["step"], 0) / 60, 1),
            **{k: r.get(k) for k in keys},
        }
        for r in rows
        if "valid_loss" in r
    ]


def markdown(report: dict) -> str:
    lines = [
        "# Ranker learnability on this CPU",
        "",
        f"LLM: `{report['llm']}`; pointer prompt (user token + one signal token per candidate,"
        " letter anchors), LoRA r8 on q/k/v/o, batch 32, fp32, "
        f"{report['threads']} threads. Command: `{report['command']}`.",
        "",
        "## Synthetic tasks (answer fully determined by the soft tokens; chance 0.05)",
        "",
        "| task | signals | probe loss | LR decay over | examples | minutes "
        "| held-out accuracy (20 candidates) | command |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["synthetic"]:
        lines.append(
            f"| {r['task']} | {'relative' if r.get('relative') else 'row-normed'} | "
            f"{r['aux_weight']} | {r.get('decay_examples', 0) or 'constant'} | "
            f"{r['examples']} | {r['minutes']} | "
            f"{r['heldout_accuracy']:.3f} | `{r.get('command', report['command'])}` |"
        )
    if report.get("real"):
        lines += [
            "",
            f"## Real data: `{report['run']}` (validation users, the item among the retriever's "
            "top-20 in retriever order)",
            "",
            "| step | minutes | examples | valid loss | ranker NDCG@10 | retriever order | fused |"
            " weight | Spearman to retriever |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in report["real"]:
            lines.append(
                f"| {r['step']} | {r['minutes']} | {r['examples']} | {r['valid_loss']} | "
                f"{r['valid_ndcg@10']} | {r['valid_retriever_order_ndcg@10']} | "
                f"{r['valid_fused_ndcg@10']} | {r['rank_weight']} | "
                f"{r['valid_spearman_to_retriever']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm", type=Path, required=True)
    parser.add_argument("--run", type=Path, help="A real-data ranker run for the curve.")
    parser.add_argument(
        "--tasks",
        default="point:4,match:8,recent:4",
        help="task:minutes,... ('' keeps the recorded tasks and only reads --run's curve)",
    )
    parser.add_argument("--aux", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--decay-examples", type=int, default=0, help="cosine LR decay over N examples; 0 = none"
    )
    parser.add_argument(
        "--relative",
        action="store_true",
        help="signal columns relative to the list, no per-row layer norm (ranker.signals)",
    )
    args = parser.parse_args()
    report: dict = {
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "llm": str(args.llm),
        "threads": args.threads,
        "command": "python " + " ".join(sys.argv),
        "synthetic": [],
    }
    previous = RESULTS / "ranker_learning.json"
    specs = list(filter(None, args.tasks.split(",")))
    if previous.is_file():  # tasks not re-run (same task, decay and signals) keep their rows
        kept = json.loads(previous.read_text())
        rerun = {(spec.partition(":")[0], args.decay_examples, args.relative) for spec in specs}
        for row in kept["synthetic"]:
            if (row["task"], row.get("decay_examples", 0), row.get("relative", False)) not in rerun:
                report["synthetic"].append({"command": kept["command"], **row})
        if not specs:
            report |= {k: kept[k] for k in ("command", "load_average_start", "llm")}
        if "run" in kept and args.run is None:
            report |= {k: kept[k] for k in ("run", "real")}
    for spec in specs:
        task, _, minutes = spec.partition(":")
        result = train_synthetic(
            args.llm,
            SyntheticConfig(task=task),
            synthetic_config(
                float(minutes or 4), args.aux, args.threads, args.decay_examples, args.relative
            ),
        )
        result["aux_weight"] = args.aux
        result["decay_examples"] = args.decay_examples
        result["relative"] = args.relative
        result["command"] = report["command"]
        report["synthetic"].append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)
    if args.run is not None:
        report["run"] = str(args.run)
        report["real"] = real_curve(args.run)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ranker_learning.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "ranker_learning.md").write_text(markdown(report))


if __name__ == "__main__":
    main()
