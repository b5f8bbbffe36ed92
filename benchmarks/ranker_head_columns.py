"""Do extra candidate columns help the head ranker? Heads with and without them, one run.

The column sets (``HeadTrainConfig`` switches, issue 13's "features the ID retriever never
sees"): ``demographics`` (``ranker.demographics``: each candidate's log lift among users of the
user's gender, age band and occupation), ``ease`` (``ranker.ease``: the EASE score of the
whole history), each leaving the user's own interactions out, so a training list never sees
its own target counted; and ``lifecycle`` (``ranker.lifecycle``: each candidate's
interactions before the decision and days since its first, strictly causal).

Both heads are fitted exactly as ``tandem ranker train-head`` fits them (same teachers, lists,
epochs, seed) and validated on the served retriever's lists; the table reports each one's
tuned validation NDCG@10 and listwise loss, and the paired bootstrap interval of the
difference (with minus without) over the validation users. The head with them is
``tandem ranker train-head --demographics`` / ``--ease``.

    python benchmarks/ranker_head_columns.py --columns ease --teacher-run T10 \
        --teacher-run T15 --teacher-run T5 [--retriever-run SERVED] [--llm artifacts/llm-2]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from head_lists import CV_FOLDS, cross_fitted_losses, fit_arm, head_parser, lists_for, parsed_inputs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ranker.head_train import HeadTrainConfig  # noqa: E402
from tandem.metrics import paired_bootstrap_ci  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
COLUMNS = ("demographics", "ease", "lifecycle")  # HeadTrainConfig switches (each arm sets them)


def main() -> None:
    parser = head_parser(__doc__.splitlines()[0])
    parser.add_argument("--columns", action="append", choices=COLUMNS, required=True)
    args = parser.parse_args()
    data, tokens, (served, served_run), teachers = parsed_inputs(args)
    added = "with " + " + ".join(args.columns)
    arms, cross_fitted, shown = {}, {}, None
    for name, on in (("without", False), (added, True)):
        config = HeadTrainConfig(**dict.fromkeys(args.columns, on))
        train, (valid, valid_rows, _, _) = lists_for(
            teachers, served, tokens, config, data.catalog.index_of
        )
        if shown is None:
            shown = (train.users, train.labels, valid.labels)
        elif not all(map(np.array_equal, shown, (train.users, train.labels, valid.labels))):
            raise RuntimeError("the two arms were built on different lists")
        arms[name] = fit_arm(train.rows, train.base, train.labels, valid_rows, valid, config)
        cross_fitted[name] = cross_fitted_losses(train, config)
    results = {
        "columns": args.columns,
        "teachers": [str(t) for t in args.teacher_run],
        "served_retriever": str(served_run),
        "arms": arms_summary(arms),
        "valid_users": len(arms[added]["per_user"]),
        **paired_difference(arms[added], arms["without"]),
        "cross_fitted": cross_fitted_summary(cross_fitted[added], cross_fitted["without"]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "ranker_head_" + "_".join(args.columns)
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / f"{stem}.md").write_text(report(results))
    print(report(results))


def report(results: dict) -> str:
    command = "python benchmarks/ranker_head_columns.py " + " ".join(
        [f"--columns {c}" for c in results["columns"]]
        + [f"--teacher-run {t}" for t in results["teachers"]]
    )
    lines = [
        f"# Head ranker: do the {' + '.join(results['columns'])} columns help?",
        "",
        __doc__.split("\n\n")[1].replace("\n", " "),
        "",
        f"Command: `{command}`; served retriever `{results['served_retriever']}`. Validation: "
        f"the {results['valid_users']} validation users whose item the served retriever puts "
        "in its top-20, NDCG@10 of that item at each head's tuned fusion weight.",
        "",
        *arms_table(results["arms"]),
    ]
    lo, hi = results["ndcg10_diff_ci95"]
    lines += [
        "",
        f"With minus without: {results['ndcg10_diff']:+.4f} valid NDCG@10, paired bootstrap 95% "
        f"interval [{lo:+.4f}, {hi:+.4f}]; listwise validation loss {results['loss_diff']:+.4f}, "
        f"interval [{results['loss_diff_ci95'][0]:+.4f}, {results['loss_diff_ci95'][1]:+.4f}] "
        "(the same users, the training objective: below 0 is better).",
        "",
        *cross_fitted_lines(results["cross_fitted"]),
        "",
    ]
    return "\n".join(lines)


def cross_fitted_summary(with_: np.ndarray, without: np.ndarray) -> dict:
    """Per-user cross-fitted losses (``head_lists.cross_fitted_losses``) of two arms on the
    same lists: their means and the paired bootstrap 95% interval of the difference."""
    lo, hi = paired_bootstrap_ci(with_, without)
    return {
        "users": len(with_),
        "loss_without": round(float(without.mean()), 4),
        "loss_with": round(float(with_.mean()), 4),
        "loss_diff": round(float(with_.mean() - without.mean()), 5),
        "loss_diff_ci95": [round(lo, 5), round(hi, 5)],
    }


def paired_difference(arm: dict, base: dict) -> dict:
    """``arm`` minus ``base`` on the same validation users (their ``per_user`` NDCG@10 and
    ``per_user_loss``): each mean difference and its paired bootstrap 95% interval."""
    out = {}
    for key, per_user in (("ndcg10", "per_user"), ("loss", "per_user_loss")):
        lo, hi = paired_bootstrap_ci(arm[per_user], base[per_user])
        out[f"{key}_diff"] = round(float(arm[per_user].mean() - base[per_user].mean()), 5)
        out[f"{key}_diff_ci95"] = [round(lo, 5), round(hi, 5)]
    return out


def cross_fitted_lines(cv: dict) -> list[str]:
    """The report's sentence for ``cross_fitted_summary``."""
    lo, hi = cv["loss_diff_ci95"]
    return [
        f"Cross-fitted on the teachers' own lists ({CV_FOLDS} folds of users, each user's lists "
        f"scored by heads fitted on the other users' only; {cv['users']} users): loss "
        f"{cv['loss_with']} with, {cv['loss_without']} without, {cv['loss_diff']:+.4f}, paired "
        f"interval [{lo:+.4f}, {hi:+.4f}].",
    ]


def arms_summary(arms: dict) -> dict:
    """The arms as reported: everything but the per-user arrays."""
    return {
        name: {k: v for k, v in arm.items() if not k.startswith("per_user")}
        for name, arm in arms.items()
    }


def head_report_opening(title: str, doc: str, command: str, results: dict) -> list[str]:
    """The opening the head-column benchmarks' reports share: the title, what was done (the
    module docstring's second paragraph), the command, the lists, and the arms table."""
    return [
        f"# Head ranker: {title}",
        "",
        doc.split("\n\n")[1].replace("\n", " "),
        "",
        f"Command: `{command}`; served retriever `{results['served_retriever']}`. "
        f"{results['lists']:,} training lists; validation: the {results['valid_users']} "
        "validation users whose item the served retriever puts in its top-20.",
        "",
        *arms_table(results["arms"]),
    ]


def paired_table(against: str, pairs: dict) -> list[str]:
    """The markdown table of ``paired_difference`` results against ``against``."""
    lines = [
        f"Against {against} (the same users; loss below 0 is better):",
        "",
        "| head | loss difference, 95% interval | NDCG@10 difference, 95% interval |",
        "|---|---|---|",
    ]
    for name, paired in pairs.items():
        lo, hi = paired["loss_diff_ci95"]
        nlo, nhi = paired["ndcg10_diff_ci95"]
        lines.append(
            f"| {name} | {paired['loss_diff']:+.4f} [{lo:+.4f}, {hi:+.4f}] "
            f"| {paired['ndcg10_diff']:+.4f} [{nlo:+.4f}, {nhi:+.4f}] |"
        )
    return lines


def arms_table(arms: dict) -> list[str]:
    """The markdown table of head arms (also ``ranker_head_second_retriever.py``'s)."""
    lines = [
        "| head | columns | lists | tuned weight | valid NDCG@10 | gain over retriever, 95% "
        "interval | valid loss (retriever) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, arm in arms.items():
        lo, hi = arm["valid_gain_ci95"]
        lines.append(
            f"| {name} | {arm['columns']} | {arm['lists']:,} | {arm['rank_weight_best']} "
            f"| {arm['valid_fused_ndcg@10']:.4f} | [{lo:+.4f}, {hi:+.4f}] "
            f"| {arm['valid_loss']:.4f} ({arm['valid_retriever_loss']:.4f}) |"
        )
    return lines


if __name__ == "__main__":
    main()
