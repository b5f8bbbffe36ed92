"""``tandem ranker train-head``: the listwise head ranker (``ranker.head``), trained on teacher
retrievers' honest lists and validated on the served retriever's."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tandem.console import console, fail


def train_head(
    teacher_run: Annotated[
        list[Path],
        typer.Option(
            help="A retriever run trained with `tandem retriever train --holdout-last N` "
            "(repeat for several); the head trains on its lists at the N held-out positions."
        ),
    ],
    dataset: Annotated[str, typer.Option(help="Prepared dataset name.")] = "ml-100k",
    retriever_run: Annotated[
        Path | None,
        typer.Option(help="The served retriever it is validated with (default: the newest)."),
    ] = None,
    llm: Annotated[
        Path | None,
        typer.Option(help="An LLM folder whose tokenizer renders rows (default <artifacts>/llm)."),
    ] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the teachers' lists.")] = 30,
    lr: Annotated[float, typer.Option(min=0.0, help="AdamW learning rate.")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(min=0.0, help="AdamW weight decay.")] = 1e-2,
    max_lists: Annotated[int, typer.Option(min=1, help="Lists per teacher, at most.")] = 30_000,
    trends: Annotated[bool, typer.Option(help="Recent popularity columns.")] = True,
    covisit: Annotated[bool, typer.Option(help="Co-visitation columns.")] = True,
    demographics: Annotated[
        bool,
        typer.Option(
            help="Columns of each candidate's lift among users of the user's gender, age band "
            "and occupation (needs the dataset's users file)."
        ),
    ] = False,
    ease: Annotated[
        bool,
        typer.Option(
            help="A column of each candidate's EASE score from the whole history, the user's "
            "own row left out of the model (on: it helped on validation, "
            "benchmarks/results/ranker_head_ease.md)."
        ),
    ] = True,
    lifecycle: Annotated[
        bool,
        typer.Option(
            help="Columns of each candidate's interactions before the decision and days since "
            "its first (they lower the validation loss but not the ranking, so off: "
            "benchmarks/results/ranker_head_lifecycle.md)."
        ),
    ] = False,
    threads: Annotated[int, typer.Option(min=1, help="torch threads.")] = 2,
    seed: Annotated[int, typer.Option(help="Seed of the list order and the optimiser.")] = 0,
) -> None:
    """Stage 2 without an LLM: a linear head on the signal rows, residual on the retriever.

    Seconds of CPU once the lists are made (about a minute per teacher). The run records the
    fusion weight tuned on validation and serves only if that gain's 95% interval excludes 0;
    evaluate it on the test split with `tandem ranker evaluate --run RUN`.
    """
    import torch

    from ranker.head_train import HeadTrainConfig, Teacher
    from ranker.head_train import train_head as fit_and_save
    from ranker.inputs import load_inputs, resolve_inputs
    from ranker.llm import load_tokenizer
    from ranker.prompts import PromptTokenizer
    from tandem.artifacts import Manifest, new_run_id, resolve_run, runs_dir
    from tandem.data import Dataset
    from tandem.paths import artifacts_root, dataset_dir

    torch.set_num_threads(threads)
    root = artifacts_root()
    config = HeadTrainConfig(
        epochs=epochs, lr=lr, weight_decay=weight_decay, max_lists=max_lists, trends=trends,
        covisit=covisit, demographics=demographics, ease=ease, lifecycle=lifecycle, seed=seed,
    )  # fmt: skip
    try:
        data = Dataset.load(dataset_dir(dataset))
        runs = resolve_inputs(
            root, dataset, retriever=retriever_run, items="none", captions="none",
            preferences="none",
        )  # fmt: skip
        teachers = []
        for folder in teacher_run:
            folder = resolve_run(folder)
            holdout = Manifest.read(folder).config.get("train", {}).get("holdout_last", 0)
            teacher_runs = resolve_inputs(
                root, dataset, retriever=folder, items="none", captions="none",
                preferences="none",
            )  # fmt: skip
            teachers.append(Teacher(load_inputs(data, teacher_runs), holdout))
        tokens = PromptTokenizer(load_tokenizer(llm or root / "llm"))
        run_dir = runs_dir(root, dataset, "ranker") / new_run_id("head")
        parents = {**runs.to_parents(), "teachers": ",".join(str(t) for t in teacher_run)}
        manifest = fit_and_save(
            load_inputs(data, runs), teachers, tokens, run_dir, config, parents=parents,
            on_log=console.print,
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    table = Table(title=f"Head ranker {run_dir.name}", show_header=False)
    for key, value in manifest.metrics.items():
        table.add_row(key, str(value))
    table.add_row("saved to", str(run_dir))
    console.print(table)
    if not manifest.metrics.get("rank_weight"):
        console.print("its validation gain's interval includes 0: the gateway will not serve it")
