"""``tandem ranker evaluate`` and ``tandem ranker export``: what happens to a trained ranker run
(a two-stage evaluation; shipping it under models/ for ``make run``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tandem.commands.ranker import PRECISION_HELP, Precision
from tandem.console import console, fail


def evaluate(
    run: Annotated[
        Path | None, typer.Option(help="Ranker run folder; default: the newest ranker run.")
    ] = None,
    dataset: Annotated[str, typer.Option(help="Prepared dataset name.")] = "ml-100k",
    split: Annotated[str, typer.Option(help="'test' or 'valid'.")] = "test",
    llm: Annotated[Path | None, typer.Option(help="Base LLM folder.")] = None,
    zero_shot: Annotated[
        bool, typer.Option(help="Evaluate the bare LLM (no run) with the newest retriever.")
    ] = False,
    max_users: Annotated[
        int | None, typer.Option(min=1, help="A seeded sample of users (speed).")
    ] = None,
    ablations: Annotated[bool, typer.Option(help="Prompt ablation table.")] = True,
    random_candidates: Annotated[
        bool, typer.Option(help="HitRatio@1 / AUC over the target + 19 random items.")
    ] = True,
    mapb_users: Annotated[int, typer.Option(min=0, help="Users for CoT-Rec MAPB.")] = 8,
    fusion_users: Annotated[
        int, typer.Option(min=0, help="Validation users tuning the fusion weight.")
    ] = 943,
    permutations: Annotated[
        int | None, typer.Option(min=1, help="Orders averaged per prompt (position bias).")
    ] = None,
    precision: Annotated[Precision, typer.Option(help=PRECISION_HELP)] = Precision.auto,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per forward.")] = 8,
    threads: Annotated[int | None, typer.Option(min=1, help="torch threads.")] = None,
    json_out: Annotated[Path | None, typer.Option(help="Also write the report here.")] = None,
) -> None:
    """LlamaRec protocol (retriever top-20 -> ranker), HitRatio@1, AUC, MAPB, ablations."""
    import transformers

    from tandem.commands.evaluate import run_two_stage

    if split not in ("test", "valid"):
        fail(f"split must be 'test' or 'valid', got {split!r}")
    transformers.utils.logging.disable_progress_bar()
    run_two_stage(
        run=run,
        dataset=dataset,
        split=split,
        json_out=json_out,
        llm=llm,
        max_users=max_users,
        zero_shot=zero_shot,
        ablations=ablations,
        random_candidates=random_candidates,
        mapb_users=mapb_users,
        fusion_users=fusion_users,
        permutations=permutations,
        precision=precision.value,
        batch_size=batch_size,
        threads=threads,
    )


def export(
    run: Annotated[Path, typer.Option(help="The ranker run folder to ship.")],
    reproduce: Annotated[
        str, typer.Option(help="The exact command that trained it (goes into the manifest).")
    ],
    llm_layers: Annotated[
        int | None, typer.Option(min=1, help="Decoder layers of the LLM it was trained on.")
    ] = None,
    results: Annotated[
        Path | None, typer.Option(help="A JSON report (e.g. its test evaluation) to include.")
    ] = None,
    beside: Annotated[
        list[Path] | None,
        typer.Option(
            metavar="REPORT",
            help="A JSON report of the same ranker beside another retriever, at its served "
            "weight (`benchmarks/ranker_quality.py --retriever-run RUN --weight W`); repeatable. "
            "`make run` reports it when it serves that retriever's files.",
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Default: <models>/ranker.")] = None,
) -> None:
    """Ship a trained ranker in the repository (models/, <= 20 MiB) for `make run` to serve."""
    import json

    from ranker.shipping import ShippedRankerError, export_run, validation_summary
    from tandem.artifacts import resolve_run
    from tandem.paths import models_root

    out = out or models_root() / "ranker"
    try:
        report = json.loads(results.read_text()) if results else None
        others = [json.loads(path.read_text()) for path in beside or []]
        manifest = export_run(
            resolve_run(run), out, reproduce=reproduce, llm_layers=llm_layers, results=report,
            beside=others,
        )  # fmt: skip
    except (FileNotFoundError, ShippedRankerError, json.JSONDecodeError) as exc:
        fail(str(exc))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    console.print(f"shipped {manifest.run_id} to {out} ({size / 2**20:.1f} MiB)")
    console.print(validation_summary(manifest))
