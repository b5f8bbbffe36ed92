"""Does a per-item calibration column (how often an item is chosen when the retriever lists it,
against how often the retriever expects) lower the head's loss?

The head is a residual on the retriever: what it can still add per item is where the retriever
is systematically wrong about that item, e.g. an item it lists often but people rarely pick
next. The teachers' held-out lists measure exactly that. For item ``i`` over every training
list: ``hits_i`` (lists where ``i`` was the next item) and ``expected_i`` (the sum of the
retriever's in-list probability of ``i``); the column is ``log((hits_i + a) / (expected_i +
a))``, with ``a`` smoothing rare items towards 0, appended raw and relative to the list (as
the rows' own columns are). Validation lists read the full table; a training list must not
see its own target counted. Leaving out only the list itself is not enough: the teachers'
positions overlap (``--holdout-last 5``'s are inside 10's and 15's), so a user's position can
appear in three lists with the same target, and the other two copies still count it. Both are
measured: each list's own list left out, and each list's user's lists all left out.

Each list is built exactly as ``tandem ranker train-head`` builds it (the teachers' held-out
lists, the served retriever's validation lists; ``RecordingMaker`` records the candidates), with
and without the ``demographics`` columns; every head is fitted as ``fit_head`` fits it. The
table reports each head's validation loss and tuned NDCG@10, and paired bootstrap intervals
against the head without either (the shipped configuration). A second measurement has ~30x the
lists: cross-fitted on the teachers' own lists (``head_lists.cross_fitted_losses``), each fold's
table counted on the fitted users' lists only.

    python benchmarks/ranker_head_item_calibration.py --teacher-run T10 --teacher-run T15 \
        --teacher-run T5 [--retriever-run SERVED] [--smoothing 0.5] [--llm artifacts/llm-2]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from head_lists import (
    CV_FOLDS,
    TrainingLists,
    cross_fitted_losses,
    fit_arm,
    head_parser,
    lists_for,
    parsed_inputs,
)
from ranker_head_columns import (
    arms_summary,
    cross_fitted_summary,
    head_report_opening,
    paired_difference,
    paired_table,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ranker.head_train import (  # noqa: E402
    HeadTrainConfig,
)
from ranker.signals import relative_columns  # noqa: E402
from ranker.train_objective import retriever_log_softmax  # noqa: E402

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
    table,
    items: np.ndarray,
    base: np.ndarray,
    smoothing: float,
    labels: np.ndarray | None,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """``[n, 20, 2]``: each candidate's ``log((hits + a) / (expected + a))``, raw and relative
    to its list. With ``labels`` (training lists) what each list's group added to the table
    is left out: ``groups`` (e.g. the lists' users; default: each list alone)."""
    hits, expected = (t[items].astype(np.float64) for t in table)
    if labels is not None:
        own_hits, own_expected = group_contributions(items, base, labels, groups)
        hits = np.maximum(hits - own_hits, 0.0)
        expected = np.maximum(expected - own_expected, 0.0)
    raw = np.log((hits + smoothing) / (expected + smoothing))
    rel = np.stack([relative_columns(row[:, None])[:, 0] for row in raw])
    return np.stack([raw, rel], axis=-1).astype(np.float32)


def group_contributions(items, base, labels, groups=None):
    """``[n, 20]`` each: what the lists of each list's group added to ``calibration_table``'s
    ``hits`` and ``expected`` for its candidates."""
    n = len(items)
    groups = np.arange(n) if groups is None else np.asarray(groups)
    targets = items[np.arange(n), labels]
    probs = np.exp(base)
    hits, expected = np.zeros(items.shape), np.zeros(items.shape)
    order = np.argsort(groups, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(groups[order]) != 0])
    for at in np.split(order, starts[1:]):
        shown, inverse = np.unique(items[at], return_inverse=True)
        inverse = inverse.reshape(len(at), -1)
        group_hits = np.bincount(np.searchsorted(shown, targets[at]), minlength=len(shown))
        group_expected = np.bincount(inverse.ravel(), probs[at].ravel(), minlength=len(shown))
        hits[at], expected[at] = group_hits[inverse], group_expected[inverse]
    return hits, expected


def cross_fitted_calibration(train: TrainingLists, config: HeadTrainConfig, smoothing, size):
    """``cross_fitted_losses`` with the calibration column appended, each fold's table counted
    on the fitted users' lists only (their column leaving each user's own lists out)."""

    def columns(fit, held):
        table = calibration_table(train.items[fit], train.base[fit], train.labels[fit], size)
        fit_column = calibration_column(
            table, train.items[fit], train.base[fit], smoothing, train.labels[fit], train.users[fit]
        )
        held_column = calibration_column(
            table, train.items[held], train.base[held], smoothing, None
        )
        return (
            np.concatenate([train.rows[fit], fit_column], -1),
            np.concatenate([train.rows[held], held_column], -1),
        )

    return cross_fitted_losses(train, config, columns)


def main() -> None:
    parser = head_parser(__doc__.splitlines()[0])
    parser.add_argument("--smoothing", type=float, default=0.5, help="a, in expected listings")
    args = parser.parse_args()
    data, tokens, (served, served_run), teachers = parsed_inputs(args)
    size = len(data.catalog) + 1
    arms, cross_fitted, valid_lists = {}, {}, None
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
        valid_column = calibration_column(table, valid_items, valid_base, args.smoothing, None)
        name = "demographics" if demographics else ""
        arms[name or BASE_ARM] = fit_arm(rows, base, labels, valid_rows, valid, config)
        for left_out, groups in (("own list", None), ("own user", train.users)):
            column = calibration_column(table, items, base, args.smoothing, labels, groups)
            arm = " + ".join(filter(None, [name, f"item calibration ({left_out} left out)"]))
            arms[arm] = fit_arm(
                np.concatenate([rows, column], -1),
                base,
                labels,
                np.concatenate([valid_rows, valid_column], -1),
                valid,
                config,
            )
        cross_fitted[name or "shipped columns"] = cross_fitted_summary(
            cross_fitted_calibration(train, config, args.smoothing, size),
            cross_fitted_losses(train, config),
        )
    base_arm = arms[BASE_ARM]
    results = {
        "teachers": [str(t) for t in args.teacher_run],
        "served_retriever": str(served_run),
        "smoothing": args.smoothing,
        "lists": base_arm["lists"],
        "valid_users": len(valid_lists),
        "arms": arms_summary(arms),
        "cross_fitted_on_teachers_lists": cross_fitted,
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
        "",
        f"Cross-fitted on the teachers' lists ({CV_FOLDS} folds of users; each user's mean loss "
        "on their own lists, scored by heads that never saw that user; the column leaves each "
        "user's own lists out):",
        "",
        "| columns | users | loss without | loss with the column "
        "| with minus without, 95% interval |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {cv['users']} | {cv['loss_without']} | {cv['loss_with']} | "
            f"{cv['loss_diff']:+.4f} [{cv['loss_diff_ci95'][0]:+.4f}, "
            f"{cv['loss_diff_ci95'][1]:+.4f}] |"
            for name, cv in results["cross_fitted_on_teachers_lists"].items()
        ),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
