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
the LLM folder beside them. ``RESULTS_DIR`` (environment) says where the results go.
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
from ranker.prompts import PromptLayout, PromptTokenizer  # noqa: E402
from ranker.train import TrainConfig, TrainState, fit, new_model, optimizer_for  # noqa: E402
from ranker.train_data import (  # noqa: E402
    ExampleMaker,
    TrainBatch,
    ValidationSet,
    with_side_features,
)
from ranker.train_objective import retriever_log_softmax  # noqa: E402
from tandem.artifacts import Manifest, resolve_run  # noqa: E402
from tandem.data import Dataset  # noqa: E402
from tandem.paths import artifacts_root, dataset_dir  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
LIST_FILES = {"train": "train_lists.safetensors", "valid": "valid_lists.safetensors"}


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


def save_lists(path: Path, layouts, labels, bases, ranks=None) -> None:
    """Rendered lists as flat arrays (token ids, soft slots, soft inputs in fp16 per kind) plus
    their labels and bases; the display text is not kept (training never reads it)."""
    from safetensors.numpy import save_file

    kinds = sorted({k for layout in layouts for k in layout.soft_kinds})
    flat = {
        "token_ids": [i for lo in layouts for i in lo.token_ids],
        "soft_positions": [p for lo in layouts for p in lo.soft_positions],
        "soft_slots": [s for lo in layouts for s in lo.soft_slots],
        "soft_kinds": [kinds.index(k) for lo in layouts for k in lo.soft_kinds],
    }
    tensors = {name: np.asarray(values, dtype=np.int32) for name, values in flat.items()}
    if tensors["token_ids"].max(initial=0) < 2**16:  # half the bytes to carry
        tensors["token_ids"] = tensors["token_ids"].astype(np.uint16)
    tensors["token_offsets"] = np.cumsum([0] + [len(lo.token_ids) for lo in layouts])
    tensors["soft_offsets"] = np.cumsum([0] + [len(lo.soft_positions) for lo in layouts])
    tensors["letter_ids"] = np.asarray([lo.letter_token_ids for lo in layouts], dtype=np.int32)
    tensors["history_used"] = np.asarray([lo.history_used for lo in layouts], dtype=np.int32)
    for n, kind in enumerate(kinds):
        pairs = [zip(lo.soft_inputs, lo.soft_kinds, strict=True) for lo in layouts]
        rows = [r for pair in pairs for r, k in pair if k == kind]
        tensors[f"soft_inputs.{n}"] = np.stack(rows).astype(np.float16)
    tensors["labels"] = np.asarray(labels, dtype=np.int64)
    tensors["bases"] = np.asarray(bases, dtype=np.float32)
    if ranks is not None:
        tensors["retriever_ranks"] = np.asarray(ranks, dtype=np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"kinds": json.dumps(kinds)})


def load_lists(path: Path, text_only: bool = False) -> tuple[list[PromptLayout], dict]:
    """``save_lists``' layouts (with ``text_only``: their soft tokens cut out) and the arrays."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(str(path), framework="np") as handle:
        kinds = json.loads(handle.metadata()["kinds"])
    t = load_file(str(path))
    tokens, soft = t["token_offsets"], t["soft_offsets"]
    taken = dict.fromkeys(range(len(kinds)), 0)
    layouts = []
    for n in range(len(t["labels"])):
        ids = t["token_ids"][tokens[n] : tokens[n + 1]].tolist()
        positions = t["soft_positions"][soft[n] : soft[n + 1]].tolist()
        codes = t["soft_kinds"][soft[n] : soft[n + 1]].tolist()
        inputs = []
        for code in codes:
            inputs.append(t[f"soft_inputs.{code}"][taken[code]].astype(np.float32))
            taken[code] += 1
        if text_only:
            cut = set(positions)
            ids = [i for k, i in enumerate(ids) if k not in cut]
            positions, codes, inputs = [], [], []
        layouts.append(
            PromptLayout(
                token_ids=tuple(ids),
                letter_token_ids=tuple(t["letter_ids"][n].tolist()),
                text="",
                soft_positions=tuple(positions),
                soft_kinds=tuple(kinds[c] for c in codes),
                soft_inputs=tuple(inputs),
                soft_slots=() if text_only else tuple(t["soft_slots"][soft[n] : soft[n + 1]]),
                history_used=int(t["history_used"][n]),
            )
        )
    return layouts, t


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
    return parser.parse_args()


def make_lists(args, prompt, tokens):
    """The teachers' training lists and the served retriever's validation lists, each with the
    head's base: ``(layouts, labels, bases)`` and a ``ValidationSet`` whose scores are bases."""

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
    maker = ExampleMaker(served, examples(0, data.split().num_users), tokens)
    valid = maker.validation_set()
    pairs = zip(valid.layouts, valid.retriever_scores, strict=True)
    valid_bases = np.stack([head_base(head, layout, scores) for layout, scores in pairs])
    return (layouts, labels, bases), replace(valid, retriever_scores=valid_bases)


def read_lists(folder: Path, text_only: bool):
    layouts, arrays = load_lists(folder / LIST_FILES["train"], text_only)
    train = (layouts, arrays["labels"].tolist(), list(arrays["bases"]))
    layouts, arrays = load_lists(folder / LIST_FILES["valid"], text_only)
    valid = ValidationSet(
        layouts, arrays["labels"], arrays["retriever_ranks"], arrays["bases"].astype(np.float64)
    )
    return train, valid


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
        (layouts, labels, bases), valid = read_lists(args.lists, args.text_only)
    else:
        if not args.teacher_run:
            raise SystemExit("give --teacher-run (one or more), or --lists")
        (layouts, labels, bases), valid = make_lists(args, prompt, tokens)
    if args.save_lists is not None:
        save_lists(args.save_lists / LIST_FILES["train"], layouts, labels, bases)
        save_lists(args.save_lists / LIST_FILES["valid"], valid.layouts, valid.labels,
                   valid.retriever_scores, valid.retriever_ranks)  # fmt: skip
        print(f"{len(labels)} training and {len(valid.labels)} validation lists in "
              f"{args.save_lists}")  # fmt: skip
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
        device=args.device, eval_every=args.eval_every, checkpoint_every=10**9, seed=args.seed,
    )  # fmt: skip
    source = ListSource(layouts, labels, bases, args.seed)
    model = new_model(load_model(args.llm), source, tokens, config)
    state = TrainState()
    stopped = fit(model, source, config, state, optimizer_for(model, config), valid=valid,
                  log=io.StringIO(), say=lambda m: print(m, flush=True))  # fmt: skip
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
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
