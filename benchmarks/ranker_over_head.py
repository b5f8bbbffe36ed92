"""Does the LLM add anything over the head ranker? The LLM trained as a residual on the head.

The served stage 2 is the head ranker (``ranker.head``): a linear listwise head on the signal
rows, trained on teacher retrievers' honest lists. The LLM ranker reads the same rows, as soft
tokens. Here it trains on the same honest lists with the residual loss, but its base is the
*head's* fused score (``scale * log_softmax(retriever) + rows @ w``) instead of the retriever's:
the LLM can then only add what the head misses. Projectors only (the LoRA stays frozen: with
it, the LLM memorised 3.3k lists in two epochs, ``ranker_real_runs.md``).

Validated on the served retriever's lists (validation users whose item it retrieves), with the
base the head gives them: each validation point tunes the fusion weight between head and LLM
and its paired bootstrap interval against the head alone (``served_weight``). The LLM earns a
place only if an interval excludes 0. Writes ``benchmarks/results/ranker_over_head.{json,md}``.

    python benchmarks/ranker_over_head.py --head models/ranker --llm artifacts/llm-2 \\
        --teacher-run T10 --teacher-run T15 --teacher-run T5 [--max-minutes 16]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ranker.head import HeadRanker  # noqa: E402
from ranker.head_train import (  # noqa: E402
    PROMPT,
    HeadTrainConfig,
    candidate_rows,
    example_config,
    full_lists,
)
from ranker.inputs import load_inputs, resolve_inputs  # noqa: E402
from ranker.llm import load_model, load_tokenizer  # noqa: E402
from ranker.prompts import PromptTokenizer  # noqa: E402
from ranker.train import TrainConfig, TrainState, fit, new_model, optimizer_for  # noqa: E402
from ranker.train_data import ExampleMaker, TrainBatch, with_side_features  # noqa: E402
from ranker.train_objective import retriever_log_softmax  # noqa: E402
from tandem.artifacts import Manifest, resolve_run  # noqa: E402
from tandem.data import Dataset  # noqa: E402
from tandem.paths import artifacts_root, dataset_dir  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def head_base(head, layout, scores) -> np.ndarray:
    """The head's fused log-score of one list: what the LLM's logits are added to."""
    base = head.scale * retriever_log_softmax([scores]).numpy()[0]
    return base + candidate_rows(layout) @ head.weight + head.bias


class ListSource:
    """Training lists held in memory, in a seeded order per epoch (``ExampleSource``)."""

    def __init__(self, layouts, labels, bases, seed: int = 0):
        self.layouts, self.labels, self.bases, self.seed = layouts, labels, bases, seed
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            rng = np.random.default_rng([self.seed, epoch])
            self._orders = {epoch: rng.permutation(len(self.labels))}
        return self._orders[epoch]

    def batch(self, cursor: int, size: int, num_candidates: int = 20) -> TrainBatch:
        picked = [int(self._order(k // len(self.labels))[k % len(self.labels)])
                  for k in range(cursor, cursor + size)]  # fmt: skip
        return TrainBatch(
            [self.layouts[i] for i in picked],
            [self.labels[i] for i in picked],
            [self.bases[i] for i in picked],
            size,
        )


def lists_of(maker: ExampleMaker, head) -> tuple[list, list[int], list[np.ndarray]]:
    """Every 20-candidate list of one teacher (one pass), with the head's base per list."""
    layouts, labels, bases = [], [], []
    for layout, label, scores in full_lists(maker):
        layouts.append(layout)
        labels.append(label)
        bases.append(head_base(head, layout, scores))
    return layouts, labels, bases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head", type=Path, default=REPO / "models" / "ranker")
    parser.add_argument("--llm", type=Path, required=True)
    parser.add_argument("--teacher-run", type=Path, action="append", required=True)
    parser.add_argument("--retriever-run", default=None, help="Served; default the newest.")
    parser.add_argument("--max-minutes", type=float, default=16.0)
    parser.add_argument("--projector-lr", type=float, default=2e-3)
    parser.add_argument("--projector-hidden", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--titles",
        action="store_true",
        help="Each candidate's title (10 tokens at most) before its signal token: text, what "
        "the head cannot read. Writes ranker_over_head_titles.{json,md}.",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompt = replace(PROMPT, item_titles=True, max_title_tokens=10) if args.titles else PROMPT

    def examples(steps_per_user: int, valid_users: int):
        return replace(
            example_config(HeadTrainConfig(), steps_per_user, valid_users), prompt=prompt
        )

    started = time.perf_counter()
    head = HeadRanker.load(args.head).backend.head
    data = Dataset.load(dataset_dir("ml-100k"))
    tokens = PromptTokenizer(load_tokenizer(args.llm))
    none = {"items": "none", "captions": "none", "preferences": "none"}
    layouts, labels, bases = [], [], []
    for teacher in args.teacher_run:
        teacher = resolve_run(teacher)
        holdout = Manifest.read(teacher).config["train"]["holdout_last"]
        inputs = load_inputs(data, resolve_inputs(artifacts_root(), "ml-100k", retriever=teacher,
                                                  **none))  # fmt: skip
        maker = ExampleMaker(with_side_features(inputs), examples(holdout, 0), tokens)
        more = lists_of(maker, head)
        for whole, part in zip((layouts, labels, bases), more, strict=True):
            whole.extend(part)
    served_runs = resolve_inputs(artifacts_root(), "ml-100k", retriever=args.retriever_run, **none)
    served = with_side_features(load_inputs(data, served_runs))
    maker = ExampleMaker(served, examples(0, data.split().num_users), tokens)
    valid = maker.validation_set()
    pairs = zip(valid.layouts, valid.retriever_scores, strict=True)
    valid_bases = np.stack([head_base(head, layout, scores) for layout, scores in pairs])
    valid = replace(valid, retriever_scores=valid_bases)  # the base every metric reads: the head
    made_s = time.perf_counter() - started

    config = TrainConfig(
        prompt=prompt, candidates="retrieved", residual=True, distill_weight=0.0,
        aux_weight=1.0, side_features=True, trends=True, covisit=True,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), stage1_steps=10**9,
        projector_lr=args.projector_lr, projector_hidden=args.projector_hidden, lr=1e-3,
        batch_size=32, warmup_steps=10, decay_examples=int(len(labels) * 4), max_steps=10**6,
        max_minutes=args.max_minutes, precision="fp32", threads=args.threads,
        eval_every=args.eval_every, checkpoint_every=10**9,
    )  # fmt: skip
    source = ListSource(layouts, labels, bases)
    model = new_model(load_model(args.llm), source, tokens, config)
    state = TrainState()
    stopped = fit(model, source, config, state, optimizer_for(model, config), valid=valid,
                  log=io.StringIO(), say=lambda m: print(m, flush=True))  # fmt: skip
    base_loss = float(
        torch.nn.functional.cross_entropy(
            torch.log_softmax(torch.as_tensor(valid_bases, dtype=torch.float32), -1),
            torch.as_tensor(valid.labels),
        )
    )
    report = {
        "command": "python " + " ".join(sys.argv),
        "head": str(args.head),
        "teachers": [str(t) for t in args.teacher_run],
        "titles": args.titles,
        "train_lists": len(labels),
        "valid_users": len(valid.labels),
        "head_valid_loss": round(base_loss, 4),
        "seconds_to_make_lists": round(made_s, 1),
        "stopped_by": stopped,
        "examples": state.examples,
        "examples_per_second": round(state.examples / max(state.seconds, 1e-9), 2),
        "validations": state.validations,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "ranker_over_head" + ("_titles" if args.titles else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    rows = report["validations"]
    best = min(rows, key=lambda r: r["valid_loss"]) if rows else None
    lines = [
        "# The LLM as a residual on the head ranker",
        "",
        f"Command: `{report['command']}`. {report['train_lists']} honest training lists from "
        f"{len(report['teachers'])} teacher retrievers; candidate titles shown: "
        f"{report.get('titles', False)}; the LLM's logits are added to the head's "
        f"fused log-scores (projectors only, LoRA frozen); validation: {report['valid_users']} "
        "users whose item the served retriever retrieves, with the head's score as the base. "
        f"{report['examples']} examples at {report['examples_per_second']} examples/s "
        f"({report['stopped_by']}).",
        "",
        f"The head alone: validation loss {report['head_valid_loss']}. Each row: the loss of head "
        "+ LLM, the fusion weight tuned between them, the NDCG@10 it reaches and the paired 95% "
        "interval of its gain over the head alone (weight 0).",
        "",
        "| examples | valid loss | tuned weight | valid NDCG@10 | gain over the head, 95% |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['examples']} | {r['valid_loss']} | {r.get('rank_weight_best')} | "
            f"{r.get('valid_fused_ndcg@10')} | {r.get('valid_gain_ci95')} |"
        )
    if best is not None:
        gain = [r for r in rows if r.get("rank_weight", 0) > 0]
        lines += [
            "",
            f"Lowest validation loss {best['valid_loss']} after {best['examples']} examples "
            f"(head alone {report['head_valid_loss']}). "
            + (
                f"{len(gain)} validation point(s) have a gain interval above 0."
                if gain
                else "No validation point's gain interval is above 0: the LLM adds nothing "
                "measurable to the head here, so the head alone stays served."
            ),
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
