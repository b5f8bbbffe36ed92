"""EASE alone on MovieLens-100K validation, per ridge: how ``ranker.ease.LAMBDA`` was chosen.

Each ridge fits ``EaseTable`` on the training sequences and ranks every item for every
validation user from the whole training history (history masked, full ranking, ties counted
against the target, as ``tandem.evaluate`` ranks), NDCG@10 of the validation item. The test
split is never read.

    python benchmarks/ease_lambda.py [--lams 50,150,300,600,1200]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ranker.ease import LAMBDA, EaseTable  # noqa: E402
from tandem.data import Dataset  # noqa: E402
from tandem.metrics import ndcg_per_user  # noqa: E402
from tandem.paths import dataset_dir  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def validation_ranks(table: EaseTable, train: list[np.ndarray], targets: np.ndarray):
    """0-based rank of each user's validation item among all items, history masked."""
    p = table.inverse
    weights = np.eye(len(p)) - p / np.diag(p)[None, :]
    np.fill_diagonal(weights, 0.0)
    ranks = np.empty(len(train), dtype=np.int64)
    for user, seq in enumerate(train):
        seen = np.unique(seq)
        scores = weights[seen].sum(axis=0)
        scores[0] = -np.inf
        scores[seen] = -np.inf
        ranks[user] = int((scores >= scores[targets[user]]).sum()) - 1  # ties count against
    return ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lams", default="50,150,300,600,1200")
    args = parser.parse_args()
    data = Dataset.load(dataset_dir("ml-100k"))
    split = data.split()
    rows = []
    for lam in (float(x) for x in args.lams.split(",")):
        table = EaseTable.build(split.train, data.catalog.num_items, lam)
        ranks = validation_ranks(table, split.train, split.valid_target)
        rows.append({"lam": lam, "valid_ndcg@10": round(float(ndcg_per_user(ranks, 10).mean()), 4)})
    best = max(rows, key=lambda r: r["valid_ndcg@10"])
    results = {"users": split.num_users, "rows": rows, "best": best, "LAMBDA": LAMBDA}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ease_lambda.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# EASE alone on validation, per ridge",
        "",
        __doc__.split("\n\n")[1].replace("\n", " "),
        "",
        "| lam | valid NDCG@10 |",
        "|---|---|",
        *(f"| {r['lam']:g} | {r['valid_ndcg@10']:.4f} |" for r in rows),
        "",
        f"Best: {best['lam']:g}; `ranker.ease.LAMBDA` is {LAMBDA:g}.",
        "",
    ]
    (RESULTS / "ease_lambda.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
