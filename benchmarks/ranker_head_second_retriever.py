"""Does a second sequential retriever's score, as head columns, lower the head's loss?

An ensemble of two sequence models is the usual next lever once one model's score, EASE and
co-visitation are in (the retriever tuning found SASRec + LRURec within noise of LRURec
alone as a *retriever*, ``retriever_tuning.md``; here the head learns how to weigh it).
Each list is built exactly as ``tandem ranker train-head`` builds it (the LRURec teachers'
held-out lists, the served LRURec's validation lists); the second model, trained with the
same ``--holdout-last`` as each teacher (the served one for validation), scores the same 20
candidates from the same history. Its columns (z-score, log-softmax and rank over the list,
made relative to the list as the rows' own score columns are) are appended to each row.
Both heads are fitted as ``fit_head`` fits them; the table reports each one's validation loss
and tuned NDCG@10, and paired bootstrap intervals of the differences (with minus without).

    python benchmarks/ranker_head_second_retriever.py --teacher-run T10 --second-run S10 \
        --teacher-run T15 --second-run S15 --teacher-run T5 --second-run S5 \
        --second-served SERVED_SASREC [--retriever-run SERVED] [--llm artifacts/llm-2]

(``S*``: ``tandem retriever train --model sasrec --holdout-last N``, paired with the
``--teacher-run`` of the same N, in the same order.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from head_lists import RecordingMaker, fit_arm, head_parser, parsed_inputs
from ranker_head_columns import arms_summary, head_report_opening, paired_difference

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ranker.examples import CandidateSource  # noqa: E402
from ranker.head_train import (  # noqa: E402
    HeadTrainConfig,
    candidate_rows,
    collect,
    example_config,
)
from ranker.inputs import load_retriever  # noqa: E402
from ranker.signals import relative_columns, score_columns  # noqa: E402
from tandem.artifacts import Manifest, resolve_run  # noqa: E402
from tandem.data import Catalog  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def second_columns(
    source: CandidateSource, catalog: Catalog, lists: list[tuple[list[str], list[str]]]
) -> np.ndarray:
    """``[lists, 20, 3]``: the second model's score columns over each list (z-score,
    log-softmax, rank: ``ranker.signals.score_columns``), relative to the list as the signal
    rows' own score columns are (``relative_columns``)."""
    histories = [catalog.index_of(history) for history, _ in lists]
    candidates = np.stack([catalog.index_of(shown) for _, shown in lists])
    vectors = np.concatenate(
        [source.user_vectors(histories[i : i + 256]) for i in range(0, len(histories), 256)]
    )
    scores = np.einsum("bnd,bd->bn", source.item_table[candidates], vectors).astype(np.float64)
    return np.stack([relative_columns(score_columns(s)) for s in scores]).astype(np.float32)


def main() -> None:
    parser = head_parser(__doc__.splitlines()[0])
    parser.add_argument("--second-run", type=Path, action="append", required=True)
    parser.add_argument("--second-served", type=Path, required=True)
    args = parser.parse_args()
    if len(args.teacher_run) != len(args.second_run):
        parser.error("one --second-run per --teacher-run, in the same order")
    data, tokens, (served, served_run), teachers = parsed_inputs(args)
    config = HeadTrainConfig()

    def second(run: Path) -> CandidateSource:
        return CandidateSource(load_retriever(resolve_run(run)))

    parts = []
    for run, (teacher, holdout), other in zip(
        args.teacher_run, teachers, args.second_run, strict=True
    ):
        if Manifest.read(resolve_run(other)).config["train"]["holdout_last"] != holdout:
            parser.error(f"{other} does not hold out the last {holdout} items as {run} does")
        maker = RecordingMaker(teacher, example_config(config, holdout, 0), tokens)
        rows, base, labels = collect(maker, config.max_lists)
        parts.append((rows, second_columns(second(other), data.catalog, maker.lists), base, labels))
    rows, extra, base, labels = (np.concatenate(p) for p in zip(*parts, strict=True))

    maker = RecordingMaker(served, example_config(config, 0, data.split().num_users), tokens)
    valid = maker.validation_set()
    valid_rows = np.stack([candidate_rows(layout) for layout in valid.layouts])
    valid_extra = second_columns(second(args.second_served), data.catalog, maker.lists)

    arms = {
        name: fit_arm(train_x, base, labels, valid_x, valid, config)
        for name, train_x, valid_x in (
            ("without", rows, valid_rows),
            ("with the second retriever", np.concatenate([rows, extra], -1),
             np.concatenate([valid_rows, valid_extra], -1)),
        )
    }  # fmt: skip
    results = {
        "teachers": [str(t) for t in args.teacher_run],
        "second_runs": [str(s) for s in args.second_run],
        "served_retriever": str(served_run),
        "second_served": str(args.second_served),
        "lists": len(labels),
        "valid_users": len(valid.labels),
        "arms": arms_summary(arms),
        **paired_difference(arms["with the second retriever"], arms["without"]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ranker_head_second_retriever.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "ranker_head_second_retriever.md").write_text(report(results))
    print(report(results))


def report(results: dict) -> str:
    pairs = " ".join(
        f"--teacher-run {t} --second-run {s}"
        for t, s in zip(results["teachers"], results["second_runs"], strict=True)
    )
    command = (
        f"python benchmarks/ranker_head_second_retriever.py {pairs} "
        f"--second-served {results['second_served']}"
    )
    lines = head_report_opening("does a second retriever's score help?", __doc__, command, results)
    lo, hi = results["ndcg10_diff_ci95"]
    loss_lo, loss_hi = results["loss_diff_ci95"]
    lines += [
        "",
        f"With minus without: {results['ndcg10_diff']:+.4f} valid NDCG@10, paired bootstrap 95% "
        f"interval [{lo:+.4f}, {hi:+.4f}]; listwise validation loss {results['loss_diff']:+.4f}, "
        f"interval [{loss_lo:+.4f}, {loss_hi:+.4f}] (below 0 is better).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
