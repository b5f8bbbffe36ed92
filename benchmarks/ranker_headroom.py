"""How much can the ranker's inputs add to the retriever? Small listwise heads on the same rows.

Before spending CPU hours on the LLM, ask the data: the candidate signal rows the ranker reads
(``ranker.signals``, with side features and recent popularity, exactly as training renders
them) go into small listwise models trained with cross-entropy on the true candidate, on the
same examples (retriever top-20, target retrieved, shuffled):

- ``retriever``: the retriever's log-softmax alone (the teacher, nothing learned);
- ``features only``: an MLP on the rows, no retriever score added (can it rebuild the teacher?);
- ``residual linear`` / ``residual MLP``: the retriever's log-softmax times a learned scale plus
  a head on the rows, starting at exactly the retriever (the head's last layer is zero).

Scored like the ranker's own validation: validation users whose item is in the top-20,
NDCG@10 of that item, with a paired bootstrap 95% interval against retriever order. If no
head beats the retriever here, the LLM has no signal to find in these inputs either; if one
does, its gain bounds what training the LLM on them can be expected to add.

Writes ``benchmarks/results/ranker_headroom.{json,md}``.

    python benchmarks/ranker_headroom.py --llm artifacts/llm-2 [--examples 30000] [--relative]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ranker.head_train import (  # noqa: E402
    HeadTrainConfig,
    ListwiseHead,
    candidate_rows,
    collect,
    fit_head,
)
from ranker.inputs import load_inputs, resolve_inputs  # noqa: E402
from ranker.llm import load_tokenizer  # noqa: E402
from ranker.prompts import PromptConfig, PromptTokenizer  # noqa: E402
from ranker.train_data import ExampleConfig, ExampleMaker, with_side_features  # noqa: E402
from ranker.train_objective import retriever_log_softmax  # noqa: E402
from ranker.train_validate import ranks_from_logits  # noqa: E402
from tandem.data import Dataset  # noqa: E402
from tandem.metrics import ndcg_per_user, paired_bootstrap_ci  # noqa: E402
from tandem.paths import artifacts_root, dataset_dir  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def retriever_on_positions(maker: ExampleMaker, sample: int = 3000, seed: int = 0) -> dict:
    """The training retriever on a sample of the training pool's positions vs on validation:
    recall@20 and NDCG@10 over all of them, and NDCG@10 among the retrieved. A retriever much
    better on training positions than on validation hands a ranker trained there lists that
    are easier than served ones."""
    rng = np.random.default_rng(seed)
    pool = maker.pool[rng.choice(len(maker.pool), size=min(sample, len(maker.pool)), replace=False)]
    histories = [maker.split.train[u][:p] for u, p in pool]
    targets = [maker.split.train[u][p] for u, p in pool]
    sides = {
        "training_positions": (histories, targets),
        "validation": (maker.split.valid_inputs(), maker.split.valid_target),
    }
    out = {}
    for name, (inputs, wanted) in sides.items():
        _, top, _ = maker._vectors_and_top(list(inputs))
        ranks = np.array(
            [
                int(np.flatnonzero(row == item)[0]) if (row == item).any() else -1
                for row, item in zip(top, wanted, strict=True)
            ]
        )
        ndcg = ndcg_per_user(ranks, 10)
        out[name] = {
            "lists": len(ranks),
            "recall@20": round(float((ranks >= 0).mean()), 4),
            "ndcg@10": round(float(ndcg.mean()), 4),
            "ndcg@10_retrieved": round(float(ndcg[ranks >= 0].mean()), 4),
        }
    return out


def test_result(head: ListwiseHead, test, num_users: int) -> dict:
    """Test NDCG@10 over all users (misses score 0) of the head and of retriever order, and
    the paired bootstrap 95% interval of the difference."""
    rows = torch.as_tensor(np.stack([candidate_rows(layout) for layout in test.layouts]))
    with torch.no_grad():
        scores = head(rows, retriever_log_softmax(test.retriever_scores)).numpy()
    ours, base = np.zeros(num_users), np.zeros(num_users)
    ours[: len(test.labels)] = ndcg_per_user(ranks_from_logits(scores, test.labels), 10)
    base[: len(test.labels)] = ndcg_per_user(test.retriever_ranks, 10)
    lo, hi = paired_bootstrap_ci(ours, base)
    return {
        "users": num_users,
        "retrieved_users": len(test.labels),
        "ndcg@10": round(float(ours.mean()), 4),
        "retriever_ndcg@10": round(float(base.mean()), 4),
        "diff_ci95": [round(lo, 4), round(hi, 4)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm", type=Path, required=True, help="Its tokenizer renders prompts.")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--retriever-run", default=None, help="Default: the newest.")
    parser.add_argument("--examples", type=int, default=30000, help="Training lists.")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--relative", action="store_true", help="Relative signal columns.")
    parser.add_argument("--covisit", action="store_true", help="Co-visitation columns.")
    parser.add_argument(
        "--steps-per-user",
        type=int,
        default=0,
        help="Train on each user's last N positions only (a --holdout-last N retriever's).",
    )
    parser.add_argument(
        "--valid-retriever-run",
        default=None,
        help="Validate on this retriever's lists (default: --retriever-run's), e.g. the served "
        "retriever after training on a teacher's; use with --no-embeddings.",
    )
    parser.add_argument(
        "--no-embeddings",
        action="store_true",
        help="Signal rows without retriever-space columns (PromptConfig.signal_embeddings).",
    )
    parser.add_argument(
        "--test",
        action="store_true",
        help="Also score every head on the test split: all users, a miss when the item was "
        "not retrieved (LlamaRec protocol), against the retriever alone.",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    data = Dataset.load(dataset_dir(args.dataset))
    tokens = PromptTokenizer(load_tokenizer(args.llm))
    prompt = PromptConfig.pointer(
        relative_signals=args.relative, signal_embeddings=not args.no_embeddings
    )
    config = ExampleConfig(
        prompt=prompt, candidates="retrieved", trends=True, covisit=args.covisit, shuffle=True,
        valid_users=data.split().num_users, steps_per_user=args.steps_per_user, seed=args.seed,
    )  # fmt: skip

    def maker_for(retriever_run: str | None) -> tuple[ExampleMaker, Path]:
        runs = resolve_inputs(
            artifacts_root(), args.dataset, retriever=retriever_run,
            items="none", captions="none", preferences="none",
        )  # fmt: skip
        inputs = with_side_features(load_inputs(data, runs))
        return ExampleMaker(inputs, config, tokens), runs.retriever

    maker, train_run = maker_for(args.retriever_run)
    teacher = retriever_on_positions(maker, seed=args.seed)
    rows, base, labels = collect(maker, args.examples)
    valid_run = train_run
    if args.valid_retriever_run:
        maker, valid_run = maker_for(args.valid_retriever_run)
    valid = maker.validation_set()
    v_rows = np.stack([candidate_rows(layout) for layout in valid.layouts])
    v_base = retriever_log_softmax(valid.retriever_scores)
    test = maker.validation_set("test") if args.test else None
    made_s = time.perf_counter() - started

    retriever_ndcg = ndcg_per_user(valid.retriever_ranks, 10)
    report: dict = {
        "command": "python " + " ".join(sys.argv),
        "retriever_run": str(train_run),
        "valid_retriever_run": str(valid_run),
        "signal_embeddings": not args.no_embeddings,
        "relative_signals": args.relative,
        "covisit": args.covisit,
        "steps_per_user": args.steps_per_user,
        "teacher_on_training_positions_vs_validation": teacher,
        "train_lists": len(labels),
        "signal_dim": int(rows.shape[-1]),
        "valid_users": len(valid.labels),
        "epochs": args.epochs,
        "seconds_to_make_examples": round(made_s, 1),
        "heads": {"retriever": {"valid_ndcg@10": round(float(retriever_ndcg.mean()), 4)}},
    }
    for name, hidden, with_retriever in (
        ("features only (MLP 64)", 64, False),
        ("residual linear", 0, True),
        ("residual MLP 64", 64, True),
    ):
        head = fit_head(
            ListwiseHead(rows.shape[-1], hidden, with_retriever), rows, base, labels,
            HeadTrainConfig(epochs=args.epochs, seed=args.seed),
        )  # fmt: skip
        with torch.no_grad():
            scores = head(torch.as_tensor(v_rows), torch.as_tensor(v_base)).numpy()
        ndcg = ndcg_per_user(ranks_from_logits(scores, valid.labels), 10)
        lo, hi = paired_bootstrap_ci(ndcg, retriever_ndcg)
        report["heads"][name] = {
            "valid_ndcg@10": round(float(ndcg.mean()), 4),
            "diff_vs_retriever_ci95": [round(lo, 4), round(hi, 4)],
            "retriever_scale": round(float(head.scale.detach()), 3),
        }
        if test is not None:
            report["heads"][name]["test"] = test_result(head, test, data.split().num_users)
        print(name, report["heads"][name], flush=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "ranker_headroom" + ("_relative" if args.relative else "")
    stem += "_covisit" if args.covisit else ""
    stem += f"_tail{args.steps_per_user}" if args.steps_per_user else ""
    stem += "_noemb" if args.no_embeddings else ""
    stem += "_transfer" if valid_run != train_run else ""
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    lines = [
        "# Ranker headroom: small listwise heads on the ranker's own inputs",
        "",
        f"Command: `{report['command']}`. Training lists from retriever "
        f"`{report['retriever_run']}`, validation lists from `{report['valid_retriever_run']}`; "
        f"retriever-space columns: {report['signal_embeddings']}; "
        f"co-visitation: {report.get('covisit', False)}; "
        f"{report['train_lists']} training lists (retriever top-20 with the target, shuffled; "
        f"last {report.get('steps_per_user') or 'all'} positions per user), "
        f"signal rows of {report['signal_dim']} columns (relative: "
        f"{report['relative_signals']}), {report['epochs']} epochs; validation: "
        f"{report['valid_users']} users whose item is in the top-20, NDCG@10 of that item; "
        "paired bootstrap 95% interval against retriever order.",
        "",
        "The training lists' retriever, on a sample of the training positions used vs on "
        "validation (all users): "
        + "; ".join(
            f"{side}: recall@20 {v['recall@20']}, NDCG@10 {v['ndcg@10']}, NDCG@10 among the "
            f"retrieved {v['ndcg@10_retrieved']} ({v['lists']} lists)"
            for side, v in report["teacher_on_training_positions_vs_validation"].items()
        )
        + ".",
        "",
        "| head | valid NDCG@10 | vs retriever, 95% interval | retriever scale "
        "| test NDCG@10, all users (retriever) | test vs retriever, 95% interval |",
        "|---|---|---|---|---|---|",
    ]
    for name, head in report["heads"].items():
        ci = head.get("diff_vs_retriever_ci95", "—")
        t = head.get("test")
        test = f"{t['ndcg@10']} ({t['retriever_ndcg@10']}) | {t['diff_ci95']}" if t else "— | —"
        lines.append(
            f"| {name} | {head['valid_ndcg@10']} | {ci} | {head.get('retriever_scale', '—')} "
            f"| {test} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
