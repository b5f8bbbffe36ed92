"""The head benchmarks' shared lists: the teachers' and the served retriever's, built exactly as
``tandem ranker train-head`` builds them, each recorded with what it showed (its candidates,
its user, the history it was decided after), and heads fitted and scored on them.

Two ways to score a head: on the served retriever's validation lists (``head_arm``: what
``train-head`` validates on, ~300 lists, the figures the issue asks for) and cross-fitted on
the teachers' own lists (``cross_fitted_losses``: folds of users, each user's lists scored by a
head fitted on the other users' lists only; ~30x the lists, so a column's effect can be told
from noise, but on lists of the teachers' kind rather than the served one's).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ranker.head_train import (  # noqa: E402
    HeadTrainConfig,
    ListwiseHead,
    candidate_rows,
    collect,
    example_config,
    fit_head,
    list_losses,
)
from ranker.inputs import load_inputs, resolve_inputs  # noqa: E402
from ranker.llm import load_tokenizer  # noqa: E402
from ranker.prompts import PromptTokenizer  # noqa: E402
from ranker.train_data import ExampleMaker, with_side_features  # noqa: E402
from ranker.train_validate import fused_ranks, served_weight  # noqa: E402
from tandem.artifacts import Manifest, resolve_run  # noqa: E402
from tandem.data import Dataset  # noqa: E402
from tandem.metrics import ndcg_per_user  # noqa: E402
from tandem.paths import artifacts_root, dataset_dir  # noqa: E402

CV_FOLDS = 5  # folds of users for cross_fitted_losses


class RecordingMaker(ExampleMaker):
    """An ``ExampleMaker`` that also records each rendered list's history and candidate ids,
    in render order (one list per kept example), so a second model can score the same lists,
    and each training list's user (``users``; validation renders record none)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lists: list[tuple[list[str], list[str]]] = []
        self.users: list[int] = []
        self._user_of = {id(seq): user for user, seq in enumerate(self.split.train)}

    def _render(self, inp, rng=None, own=None):
        self.lists.append(([h.item_id for h in inp.history], [c.item_id for c in inp.candidates]))
        if own is not None:
            self.users.append(self._user_of[id(own)])
        return super()._render(inp, rng, own)


@dataclass(frozen=True)
class TrainingLists:
    """The teachers' lists as ``tandem ranker train-head`` builds them, with what each one
    showed: its candidates' item indices and the length of the history it was decided after."""

    rows: np.ndarray  # [n, 20, F]
    base: np.ndarray  # the teacher's log-softmax, [n, 20]
    labels: np.ndarray  # the true candidate, [n]
    items: np.ndarray  # catalog indices, [n, 20]
    history_lengths: np.ndarray  # [n]
    holdouts: np.ndarray  # the teacher's --holdout-last, [n]
    users: np.ndarray  # the user each list was decided for, [n]


def lists_for(teachers, served, tokens, config: HeadTrainConfig, index_of):
    """The ``TrainingLists`` over every teacher, and the served retriever's validation set with
    its rows, item indices and history lengths."""
    parts = []
    for inputs, holdout in teachers:
        maker = RecordingMaker(inputs, example_config(config, holdout, 0), tokens)
        rows, base, labels = collect(maker, config.max_lists)
        shown = [
            (h, ids, user)
            for (h, ids), user in zip(maker.lists, maker.users, strict=True)
            if len(ids) == 20
        ][: len(labels)]
        items = np.stack([index_of(ids) for _, ids, _ in shown])
        lengths = np.asarray([len(h) for h, _, _ in shown])
        users = np.asarray([user for _, _, user in shown])
        holdouts = np.full(len(labels), holdout)
        parts.append((rows, base, labels, items, lengths, holdouts, users))
    train = TrainingLists(*(np.concatenate(p) for p in zip(*parts, strict=True)))
    num_users = served.dataset.split().num_users
    maker = RecordingMaker(served, example_config(config, 0, num_users), tokens)
    valid = maker.validation_set()
    valid_rows = np.stack([candidate_rows(layout) for layout in valid.layouts])
    if len(maker.lists) != len(valid.layouts):
        raise RuntimeError("the validation set rendered other lists than its own")
    valid_items = np.stack([index_of(ids) for _, ids in maker.lists])
    valid_lengths = np.asarray([len(h) for h, _ in maker.lists])
    return train, (valid, valid_rows, valid_items, valid_lengths)


def head_parser(description: str) -> argparse.ArgumentParser:
    """The options every head benchmark takes (each adds its own): the teachers, the served
    retriever, the LLM whose tokenizer renders the rows, torch threads (``parsed_inputs``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--teacher-run", type=Path, action="append", required=True)
    parser.add_argument("--retriever-run", type=Path, default=None)
    parser.add_argument("--llm", type=Path, default=None, help="its tokenizer renders the rows")
    parser.add_argument("--threads", type=int, default=2)
    return parser


def parsed_inputs(args: argparse.Namespace):
    """``head_inputs`` for a ``head_parser``'s arguments, with torch on ``--threads``."""
    torch.set_num_threads(args.threads)
    return head_inputs(args.teacher_run, args.retriever_run, args.llm)


def head_inputs(teacher_runs: list[Path], retriever_run: Path | None, llm: Path | None):
    """What the head benchmarks read: ML-100K, the tokenizer that renders the rows, the served
    retriever's inputs and run folder, and each teacher's inputs with its ``--holdout-last``."""
    root = artifacts_root()
    data = Dataset.load(dataset_dir("ml-100k"))
    tokens = PromptTokenizer(load_tokenizer(llm or root / "llm-2"))

    def inputs(run: Path | None):
        runs = resolve_inputs(
            root, "ml-100k", retriever=run, items="none", captions="none", preferences="none"
        )
        return with_side_features(load_inputs(data, runs)), runs.retriever

    teachers = [
        (inputs(run)[0], Manifest.read(resolve_run(run)).config["train"]["holdout_last"])
        for run in teacher_runs
    ]
    return data, tokens, inputs(retriever_run), teachers


def fit_arm(train_x, base, labels, valid_x, valid, config: HeadTrainConfig) -> dict:
    """A head fitted on ``train_x`` as ``fit_head`` fits it, on the validation lists
    (``head_arm``)."""
    module = fit_head(ListwiseHead(train_x.shape[-1]), train_x, base, labels, config)
    return head_arm(module, len(labels), valid_x, valid)


def head_arm(module: ListwiseHead, lists: int, valid_x, valid) -> dict:
    """A fitted head (on ``lists`` training lists) on the validation lists: its loss, tuned
    weight and NDCG@10, with per-user values for paired intervals."""
    losses, alone = list_losses(module, valid_x, valid)
    head = module.linear()
    logits = np.stack([head.scores(r) for r in valid_x])
    chosen = served_weight(logits, valid.labels, valid.retriever_scores)
    ranks = fused_ranks(logits, valid.labels, valid.retriever_scores, chosen["rank_weight_best"])
    return {
        "columns": int(valid_x.shape[-1]),
        "lists": lists,
        **chosen,
        "valid_loss": round(float(losses.mean()), 4),
        "valid_retriever_loss": round(float(alone.mean()), 4),
        "per_user": ndcg_per_user(ranks, 10),
        "per_user_loss": losses,
    }


def cross_fitted_losses(
    train: TrainingLists,
    config: HeadTrainConfig,
    columns: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
) -> np.ndarray:
    """Each user's mean listwise loss on their own teachers' lists, scored by a head fitted (as
    ``fit_head`` fits it) on the other users' lists only, ``CV_FOLDS`` seeded folds of users:
    ``[users]``, in ``np.unique(train.users)`` order, so two arms built on the same lists pair
    user by user. ``columns(fit, held)``: the fitted and the held-out lists' rows from the two
    boolean masks (default: ``train.rows``), for columns that must be counted per fold."""
    users, user_at = np.unique(train.users, return_inverse=True)
    folds = (np.random.default_rng(config.seed).permutation(len(users)) % CV_FOLDS)[user_at]
    losses = np.zeros(len(train.labels))
    for fold in range(CV_FOLDS):
        fit, held = folds != fold, folds == fold
        fit_x, held_x = columns(fit, held) if columns else (train.rows[fit], train.rows[held])
        module = fit_head(
            ListwiseHead(fit_x.shape[-1]), fit_x, train.base[fit], train.labels[fit], config
        )
        with torch.no_grad():
            logits = module(torch.as_tensor(held_x), torch.as_tensor(train.base[held]))
            losses[held] = torch.nn.functional.cross_entropy(
                logits, torch.as_tensor(train.labels[held]), reduction="none"
            ).numpy()
    return np.bincount(user_at, losses) / np.bincount(user_at)
