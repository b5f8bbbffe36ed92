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

What the head cannot read is text: ``--titles`` puts each candidate's title before its signal
token, ``--history N`` the user's last N titles before the candidates, ``--text-only`` drops the
signal tokens (the LLM then reads titles alone), ``--lora`` trains the LoRA as well. A deeper LLM
and many passes want a GPU: ``--save-lists DIR`` writes the lists (safetensors) where the data
and retrievers are, and ``--lists DIR --device cuda`` trains on them elsewhere, with nothing but
the LLM folder beside them. The best validation point (``BestPoint``) is scored once on the
test users (``held_out``), the only look at them. ``RESULTS_DIR`` (environment) says where the
results go.
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

from benchmarks.saved_lists import read_lists, write_lists  # noqa: E402
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
from ranker.train_data import (  # noqa: E402
    ExampleMaker,
    TrainBatch,
    ValidationSet,
    with_side_features,
)
from ranker.train_model import write_weights  # noqa: E402
from ranker.train_objective import retriever_log_softmax  # noqa: E402
from ranker.train_validate import fused_ranks, letter_logits_of  # noqa: E402
from ranker.two_stage import paired_comparison  # noqa: E402
from tandem.artifacts import Manifest, resolve_run  # noqa: E402
from tandem.data import Dataset  # noqa: E402
from tandem.metrics import ndcg_at_k  # noqa: E402
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


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head", type=Path, default=REPO / "models" / "ranker")
    parser.add_argument("--llm", type=Path, required=True)
    parser.add_argument("--teacher-run", type=Path, action="append", default=[])
    parser.add_argument("--retriever-run", default=None, help="Served; default the newest.")
    parser.add_argument("--max-minutes", type=float, default=16.0)
    parser.add_argument("--projector-lr", type=float, default=2e-3)
    parser.add_argument("--projector-hidden", type=int, default=0)
    parser.add_argument("--lora", action="store_true", help="Train the LoRA too (else frozen).")
    parser.add_argument("--lr", type=float, default=1e-4, help="The LoRA's learning rate.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="auto", help="auto, bf16 or fp32")
    parser.add_argument(
        "--titles",
        action="store_true",
        help="Each candidate's title (10 tokens at most) before its signal token: text, what "
        "the head cannot read. Writes ranker_over_head_titles.{json,md}.",
    )
    parser.add_argument("--history", type=int, default=0, help="The user's last N titles too.")
    parser.add_argument("--text-only", action="store_true", help="Drop the signal tokens.")
    parser.add_argument("--save-lists", type=Path, default=None, help="Write the lists, stop.")
    parser.add_argument("--lists", type=Path, default=None, help="Train on saved lists.")
    parser.add_argument("--stem", default=None, help="Results' file name (default by options).")
    parser.add_argument("--seed", type=int, default=0, help="List order and initialisation.")
    parser.add_argument(
        "--save-weights", type=Path, default=None, help="Write the best point's LoRA/projectors."
    )
    return parser.parse_args()


def make_lists(args, prompt, tokens):
    """The teachers' training lists, ``(layouts, labels, bases)``, and the served retriever's
    validation and test lists (``ValidationSet``s whose scores are the head's bases), with the
    number of users those were drawn from (the users whose item was not retrieved count too)."""

    def examples(steps_per_user: int, valid_users: int):
        return replace(
            example_config(HeadTrainConfig(), steps_per_user, valid_users), prompt=prompt
        )

    head = HeadRanker.load(args.head).backend.head
    data = Dataset.load(dataset_dir("ml-100k"))
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
    users = data.split().num_users
    maker = ExampleMaker(served, examples(0, users), tokens)

    def with_bases(lists: ValidationSet) -> ValidationSet:
        pairs = zip(lists.layouts, lists.retriever_scores, strict=True)
        scored = np.stack([head_base(head, layout, scores) for layout, scores in pairs])
        return replace(lists, retriever_scores=scored)  # the base every metric reads: the head

    valid, test = (with_bases(maker.validation_set(split)) for split in ("valid", "test"))
    return (layouts, labels, bases), valid, test, users


class BestPoint:
    """The validation point to confirm on test: the highest fused NDCG@10 among the points
    whose gain over the head has an interval above 0; its trainable weights kept in memory."""

    def __init__(self, model, state: TrainState):
        self.state, self.metrics, self.weights = state, None, None
        self.params = model.lora_parameters() + model.projector_parameters()

    def __call__(self) -> None:  # fit's checkpoint hook, run right after each validation
        latest = self.state.validations[-1] if self.state.validations else None
        if latest is None or latest["step"] != self.state.step or latest["rank_weight"] <= 0:
            return
        if (
            self.metrics is None
            or latest["valid_fused_ndcg@10"] > self.metrics["valid_fused_ndcg@10"]
        ):
            self.metrics = latest
            self.weights = [p.detach().clone() for p in self.params]

    def restore(self) -> None:
        with torch.no_grad():
            for param, kept in zip(self.params, self.weights, strict=True):
                param.copy_(kept)


def held_out(model, test: ValidationSet, users: int, weight: float, batch: int) -> dict:
    """Head alone vs head + LLM at ``weight`` on the test users (LlamaRec protocol: a user
    whose item was not retrieved is a miss for both), with the paired bootstrap interval."""
    logits = letter_logits_of(model, test.layouts, batch)
    misses = np.full(users - len(test.labels), -1)  # the users whose item was not retrieved
    ranks = {
        name: np.concatenate([fused_ranks(logits, test.labels, test.retriever_scores, w), misses])
        for name, w in (("head", 0.0), ("fused", weight))
    }
    return {
        "users": users,
        "retrieved": len(test.labels),
        "rank_weight": weight,
        "head_ndcg@10": round(ndcg_at_k(ranks["head"], 10), 4),
        "fused_ndcg@10": round(ndcg_at_k(ranks["fused"], 10), 4),
        **paired_comparison(ranks["fused"], ranks["head"], seed=0),
    }


def stem_of(args) -> str:
    if args.stem:
        return args.stem
    parts = ["ranker_over_head"]
    parts += ["titles"] if args.titles else []
    parts += [f"history{args.history}"] if args.history else []
    parts += ["textonly"] if args.text_only else []
    parts += ["lora"] if args.lora else []
    return "_".join(parts)


def main() -> None:
    args = arguments()
    if args.text_only and not args.lora:
        raise SystemExit("--text-only leaves no projector to train: add --lora")
    torch.set_num_threads(args.threads)
    prompt = PROMPT
    if args.titles or args.history:  # letters written too, so text alone still names them
        prompt = replace(PROMPT, item_titles=args.titles, max_title_tokens=10,
                         max_history=args.history, candidate_letters=True)  # fmt: skip
    started = time.perf_counter()
    tokens = PromptTokenizer(load_tokenizer(args.llm))
    if args.lists is not None:
        (layouts, labels, bases), sets = read_lists(args.lists, args.text_only)
        valid, test, users = sets["valid"], sets["test"], sets.get("test_users", 0)
    else:
        if not args.teacher_run:
            raise SystemExit("give --teacher-run (one or more), or --lists")
        (layouts, labels, bases), valid, test, users = make_lists(args, prompt, tokens)
    if args.save_lists is not None:
        write_lists(args.save_lists, (layouts, labels, bases), valid, test, users)
        print(f"{len(labels)} training, {len(valid.labels)} validation and {len(test.labels)} "
              f"test lists (of {users} users) in {args.save_lists}")  # fmt: skip
        return
    made_s = time.perf_counter() - started

    config = TrainConfig(
        prompt=prompt, candidates="retrieved", residual=True, distill_weight=0.0,
        aux_weight=0.0 if args.text_only else 1.0, side_features=True, trends=True,
        covisit=True, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
        stage1_steps=0 if args.lora else 10**9, projector_lr=args.projector_lr,
        projector_hidden=args.projector_hidden, lr=args.lr, batch_size=args.batch_size,
        warmup_steps=10, decay_examples=int(len(labels) * 4), max_steps=10**6,
        max_minutes=args.max_minutes, precision=args.precision, threads=args.threads,
        device=args.device, eval_every=args.eval_every, checkpoint_every=args.eval_every or 10**9,
        seed=args.seed,
    )  # fmt: skip
    source = ListSource(layouts, labels, bases, args.seed)
    model = new_model(load_model(args.llm), source, tokens, config)
    state = TrainState()
    best = BestPoint(model, state)
    stopped = fit(model, source, config, state, optimizer_for(model, config), valid=valid,
                  log=io.StringIO(), checkpoint=best,
                  say=lambda m: print(m, flush=True))  # fmt: skip
    confirmed = None
    if best.metrics is not None:
        best.restore()
        if args.save_weights is not None:
            write_weights(model, args.save_weights)
        if test is not None and users:
            confirmed = {"examples": best.metrics["examples"],
                         **held_out(model, test, users, best.metrics["rank_weight"],
                                    args.batch_size)}  # fmt: skip
            print(f"held out: {confirmed}", flush=True)
    base_loss = float(
        torch.nn.functional.cross_entropy(
            torch.log_softmax(torch.as_tensor(valid.retriever_scores, dtype=torch.float32), -1),
            torch.as_tensor(valid.labels),
        )
    )
    report = {
        "command": "python " + " ".join(sys.argv),
        "head": str(args.head),  # the bases' source (read when the lists were made)
        "teachers": [str(t) for t in args.teacher_run],
        "lists": str(args.lists) if args.lists else None,
        "titles": args.titles,
        "history": args.history,
        "text_only": args.text_only,
        "lora": args.lora,
        "llm_layers": model.llm.config.num_hidden_layers,
        "device": args.device,
        "prompt_tokens_mean": round(float(np.mean([len(lo.token_ids) for lo in layouts])), 1),
        "train_lists": len(labels),
        "valid_users": len(valid.labels),
        "head_valid_loss": round(base_loss, 4),
        "seconds_to_make_lists": round(made_s, 1),
        "stopped_by": stopped,
        "examples": state.examples,
        "examples_per_second": round(state.examples / max(state.seconds, 1e-9), 2),
        "validations": state.validations,
        "test": confirmed,  # the best validation point on test (None: no point to confirm)
    }
    out = Path(os.environ.get("RESULTS_DIR", RESULTS))
    out.mkdir(parents=True, exist_ok=True)
    stem = stem_of(args)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    rows = report["validations"]
    best = min(rows, key=lambda r: r["valid_loss"]) if rows else None
    lines = [
        "# The LLM as a residual on the head ranker",
        "",
        f"Command: `{report['command']}`. {report['train_lists']} honest training lists from "
        + (
            f"the saved lists in {report['lists']}"
            if report.get("lists")
            else f"{len(report['teachers'])} teacher retrievers"
        )
        + "; candidate titles shown: "
        f"{report.get('titles', False)}; history titles: {report.get('history', 0)}; signal "
        f"tokens dropped: {report.get('text_only', False)}; "
        f"{report.get('llm_layers', 2)} decoder layers on {report.get('device', 'cpu')}; "
        "the LLM's logits are added to the head's fused log-scores ("
        + ("LoRA trained" if report.get("lora") else "projectors only, LoRA frozen")
        + f"); validation: {report['valid_users']} "
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
    test = report.get("test")
    if test:
        lines += [
            "",
            f"Held out: the best of those points ({test['examples']} examples, weight "
            f"{test['rank_weight']}) on all {test['users']} test users ({test['retrieved']} with "
            f"their item retrieved; the rest are misses for both): head alone NDCG@10 "
            f"{test['head_ndcg@10']}, head + LLM {test['fused_ndcg@10']}, difference 95% "
            f"{test['ndcg10_diff_ci95']}.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
