"""``tandem evaluate``: full-ranking metrics of a trained run, stored into its manifest."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from tandem.console import console, fail


class Stage(StrEnum):
    retriever = "retriever"
    two = "two"


class Split(StrEnum):
    test = "test"
    valid = "valid"


def evaluate(
    stage: Annotated[
        Stage, typer.Option(help="'retriever': stage 1 alone; 'two': retriever + LLM ranker.")
    ] = Stage.retriever,
    run: Annotated[
        Path | None,
        typer.Option(help="Run folder, or a kind folder (its `latest` run). Default: latest run."),
    ] = None,
    dataset: Annotated[str, typer.Option(help="Dataset name, used to find the latest run.")] = (
        "ml-100k"
    ),
    split: Annotated[Split, typer.Option(help="Leave-one-out target to rank.")] = Split.test,
    json_out: Annotated[
        Path | None, typer.Option(help="Also write the metrics as JSON to this file.")
    ] = None,
) -> None:
    """Rank ALL items for every user (history masked) and report Recall/NDCG/MRR@5,10,20."""
    from tandem.artifacts import resolve_run, runs_dir
    from tandem.paths import artifacts_root

    if stage is Stage.two:
        _evaluate_two_stage(run, dataset, split.value, json_out)
        return
    try:
        run_dir = resolve_run(run or runs_dir(artifacts_root(), dataset, "retriever"))
    except FileNotFoundError as exc:
        fail(f"{exc}; train one with `tandem retriever train`")
    from retriever.evaluation import evaluate_run, store_metrics
    from tandem.evaluate import render_table

    try:
        result = evaluate_run(run_dir, split.value)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    store_metrics(run_dir, result)
    console.print(render_table(result, title=f"Retriever {run_dir.name} ({split.value})"))
    console.print(f"metrics stored in {run_dir / 'manifest.json'}")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result.to_dict(), indent=2))
        console.print(f"JSON written to {json_out}")


def _evaluate_two_stage(run: Path | None, dataset: str, split: str, json_out: Path | None) -> None:
    """Hands over to the ranker's evaluation (``ranker.evaluation.evaluate_two_stage``)."""
    try:
        from ranker.evaluation import evaluate_two_stage
    except ImportError:
        fail(
            "two-stage evaluation needs a trained ranker run and ranker.evaluation, which is "
            "not available: train one with `tandem ranker train` first"
        )
    evaluate_two_stage(run=run, dataset=dataset, split=split, json_out=json_out)
