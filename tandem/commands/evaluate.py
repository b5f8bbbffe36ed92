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
    run_two_stage(run=run, dataset=dataset, split=split, json_out=json_out)


def run_two_stage(**options) -> dict:  # type: ignore[no-untyped-def]
    """``ranker.evaluation.evaluate_two_stage`` with a progress bar and the report's tables
    (also ``tandem ranker evaluate``); a missing run, input or LLM is a clean CLI error."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from ranker.evaluation import evaluate_two_stage

    columns = ("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=console) as progress:

        def on_stage(name: str, total: int):  # type: ignore[no-untyped-def]
            task = progress.add_task(name, total=total)
            return lambda n: progress.advance(task, n)

        try:
            report = evaluate_two_stage(**options, on_stage=on_stage)
        except (FileNotFoundError, ValueError) as exc:
            fail(str(exc))
    print_two_stage(report)
    if "stored_in" in report:
        console.print(f"report stored in {report['stored_in']}")
    if options.get("json_out") is not None:
        console.print(f"JSON written to {options['json_out']}")
    return report


def print_two_stage(report: dict) -> None:
    from rich.table import Table

    ks = report["protocol"]["ks"]
    columns = [f"{m}@{k}" for k in ks for m in ("recall", "ndcg", "mrr")]
    title = (
        f"Two-stage evaluation ({report['protocol']['split']}, {report['users']} users, "
        f"{report['retrieved_users']} with the target in the top-20)"
    )
    table = Table(title=title)
    table.add_column("system")
    for column in columns:
        table.add_column(column, justify="right")
    rows = [
        ("retriever alone (all items)", report["retriever"]),
        ("retriever order, retrieved users", report["retriever_on_retrieved"]),
        ("ranker, retrieved users", report["ranker_on_retrieved"]),
        ("two-stage (misses count)", report["two_stage"]),
    ]
    if "fused" in report:
        rows.append((f"two-stage fused (w={report['fused']['weight']})", report["fused"]))
    for variant in report.get("ablations", []):
        rows.append((f"ablation: {variant['variant']}", variant["two_stage"]))
    for name, values in rows:
        table.add_row(name, *(f"{values.get(c, float('nan')):.4f}" for c in columns))
    console.print(table)
    extra = report.get("random_candidates")
    if extra:
        console.print(
            f"target + 19 random: HitRatio@1 {extra['hit_ratio@1']:.4f} (chance 0.05), "
            f"ValidRatio {extra['valid_ratio']:.0f} (letter scoring always names a candidate), "
            f"AUC {extra['auc']:.4f}"
        )
        if "retriever_hit_ratio@1" in extra:
            console.print(
                f"the retriever on the same lists: HitRatio@1 "
                f"{extra['retriever_hit_ratio@1']:.4f}, AUC {extra['retriever_auc']:.4f}"
            )
    if "mapb" in report:
        console.print(f"MAPB (lower is less position bias): {report['mapb']}")
