"""Does a per-item calibration column (how often an item is chosen when the retriever lists it,
against how often the retriever expects) lower the head's loss?

The head is a residual on the retriever: what it can still add per item is where the retriever
is systematically wrong about that item, e.g. an item it lists often but people rarely pick
next. The teachers' held-out lists measure exactly that. For item ``i`` over every training
list: ``hits_i`` (lists where ``i`` was the next item) and ``expected_i`` (the sum of the
retriever's in-list probability of ``i``); the column is ``log((hits_i + a) / (expected_i +
a))``, with ``a`` smoothing rare items towards 0, appended raw and relative to the list (as
the rows' own columns are). A training list's own target and probability are left out of its
value (leave-own-list-out), so no list sees itself; validation lists read the full table.

Each list is built exactly as ``tandem ranker train-head`` builds it (the teachers' held-out
lists, the served retriever's validation lists; ``RecordingMaker`` records the candidates), with
and without the ``demographics`` columns; every head is fitted as ``fit_head`` fits it. The
table reports each head's validation loss and tuned NDCG@10, and paired bootstrap intervals
against the head without either (the shipped configuration).

    python benchmarks/ranker_head_item_calibration.py --teacher-run T10 --teacher-run T15 \
        --teacher-run T5 [--retriever-run SERVED] [--smoothing 0.5] [--llm artifacts/llm-2]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ranker_head_columns import (
    arms_summary,
    head_report_opening,
    paired_difference,
    paired_table,
)
from ranker_head_second_retriever import RecordingMaker, fit_arm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ranker.head_train import HeadTrainConfig, candidate_rows, collect, example_config  # noqa: E402
from ranker.inputs import load_inputs, resolve_inputs  # noqa: E402
from ranker.llm import load_tokenizer  # noqa: E402
from ranker.prompts import PromptTokenizer  # noqa: E402
from ranker.signals import relative_columns  # noqa: E402
from ranker.train_data import with_side_features  # noqa: E402
from ranker.train_objective import retriever_log_softmax  # noqa: E402
from tandem.artifacts import Manifest, resolve_run  # noqa: E402
from tandem.data import Dataset  # noqa: E402
from tandem.paths import artifacts_root, dataset_dir  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
BASE_ARM = "without (shipped columns)"


def calibration_table(items: np.ndarray, base: np.ndarray, labels: np.ndarray, size: int):
    """Per item: ``hits`` (times it was the listed target) and ``expected`` (the retriever's
    in-list probability summed over its listings), from lists ``items [n, 20]``, the
    retriever's log-softmax ``base [n, 20]`` and the targets' positions ``labels [n]``."""
    targets = items[np.arange(len(items)), labels]
    hits = np.bincount(targets, minlength=size).astype(np.float64)
    expected = np.bincount(items.ravel(), weights=np.exp(base).ravel(), minlength=size)
    return hits, expected


def calibration_column(
    table, items: np.ndarray, base: np.ndarray, smoothing: float, labels: np.ndarray | None
) -> np.ndarray:
    """``[n, 20, 2]``: each candidate's ``log((hits + a) / (expected + a))``, raw and relative
    to its list; with ``labels`` (training lists) each list's own contribution is left out."""
    hits, expected = (t[items].copy() for t in table)
    if labels is not None:
        hits -= items == items[np.arange(len(items)), labels][:, None]
        expected = np.maximum(expected - np.exp(base), 0.0)
    raw = np.log((hits + smoothing) / (expected + smoothing))
    rel = np.stack([relative_columns(row[:, None])[:, 0] for row in raw])
    return np.stack([raw, rel], axis=-1).astype(np.float32)


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


def lists_for(teachers, served, tokens, config: HeadTrainConfig, index_of):
    """The ``TrainingLists`` over every teacher, and the served retriever's validation set with
    its rows, item indices and history lengths."""
    parts = []
    for inputs, holdout in teachers:
        maker = RecordingMaker(inputs, example_config(config, holdout, 0), tokens)
        rows, base, labels = collect(maker, config.max_lists)
        shown = [(h, ids) for h, ids in maker.lists if len(ids) == 20][: len(labels)]
        items = np.stack([index_of(ids) for _, ids in shown])
        lengths = np.asarray([len(h) for h, _ in shown])
        parts.append((rows, base, labels, items, lengths, np.full(len(labels), holdout)))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-run", type=Path, action="append", required=True)
    parser.add_argument("--retriever-run", type=Path, default=None)
    parser.add_argument("--smoothing", type=float, default=0.5, help="a, in expected listings")
    parser.add_argument("--llm", type=Path, default=None, help="its tokenizer renders the rows")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data, tokens, (served, served_run), teachers = head_inputs(
        args.teacher_run, args.retriever_run, args.llm
    )
    size = len(data.catalog) + 1
    arms, valid_lists = {}, None
    for demographics in (False, True):
        config = HeadTrainConfig(demographics=demographics)
        train, (valid, valid_rows, valid_items, _) = lists_for(
            teachers, served, tokens, config, data.catalog.index_of
        )
        rows, base, labels, items = train.rows, train.base, train.labels, train.items
        if valid_lists is None:
            valid_lists = valid.labels
        elif not np.array_equal(valid_lists, valid.labels):
            raise RuntimeError("the two collections built different validation lists")
        table = calibration_table(items, base, labels, size)
        valid_base = retriever_log_softmax(valid.retriever_scores).numpy()
        column = calibration_column(table, items, base, args.smoothing, labels)
        valid_column = calibration_column(table, valid_items, valid_base, args.smoothing, None)
        with_column = (
            np.concatenate([rows, column], -1),
            np.concatenate([valid_rows, valid_column], -1),
        )
        name = "demographics" if demographics else ""
        for arm, (train_x, valid_x) in (
            (name or BASE_ARM, (rows, valid_rows)),
            (" + ".join(filter(None, [name, "item calibration"])), with_column),
        ):
            arms[arm] = fit_arm(train_x, base, labels, valid_x, valid, config)
    base_arm = arms[BASE_ARM]
    results = {
        "teachers": [str(t) for t in args.teacher_run],
        "served_retriever": str(served_run),
        "smoothing": args.smoothing,
        "lists": base_arm["lists"],
        "valid_users": len(valid_lists),
        "arms": arms_summary(arms),
        "against_shipped_columns": {
            name: paired_difference(arm, base_arm) for name, arm in arms.items() if name != BASE_ARM
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ranker_head_item_calibration.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "ranker_head_item_calibration.md").write_text(report(results))
    print(report(results))


def report(results: dict) -> str:
    teachers = " ".join(f"--teacher-run {t}" for t in results["teachers"])
    command = (
        f"python benchmarks/ranker_head_item_calibration.py {teachers} "
        f"--smoothing {results['smoothing']}"
    )
    lines = [
        *head_report_opening("does a per-item calibration column help?", __doc__, command, results),
        "",
        *paired_table("the head without either", results["against_shipped_columns"]),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
