"""``tandem retriever``: train SASRec/LRURec, export ONNX, build the Faiss index."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from tandem.console import console, fail

app = typer.Typer(
    help="Stage 1: sequential retrievers (SASRec, LRURec) with an ONNX user encoder and Faiss.",
    no_args_is_help=True,
)


class ModelName(StrEnum):
    sasrec = "sasrec"
    lrurec = "lrurec"


class IndexKind(StrEnum):
    flat = "flat"
    ivf = "ivf"
    hnsw = "hnsw"


@app.command()
def train(
    model: Annotated[ModelName, typer.Option(help="Sequence encoder.")] = ModelName.lrurec,
    dataset: Annotated[
        str, typer.Option(help="Prepared dataset name (see `tandem data prepare`).")
    ] = "ml-100k",
    max_epochs: Annotated[int, typer.Option(min=1, help="Upper bound on epochs.")] = 200,
    max_minutes: Annotated[
        float, typer.Option(min=0.1, help="Wall-clock budget; the best epoch so far is kept.")
    ] = 8.0,
    patience: Annotated[
        int, typer.Option(min=1, help="Stop after this many epochs without a better NDCG@10.")
    ] = 20,
    seed: Annotated[int, typer.Option(help="Seed for initialisation and shuffling.")] = 42,
    batch_size: Annotated[int, typer.Option(min=1, help="Training windows per step.")] = 32,
    lr: Annotated[float, typer.Option(min=0.0, help="AdamW learning rate.")] = 2e-3,
    hidden: Annotated[int, typer.Option(min=8, help="Embedding size d.")] = 64,
    layers: Annotated[int, typer.Option(min=1, help="Blocks in the encoder.")] = 2,
    dropout: Annotated[float, typer.Option(min=0.0, max=0.9, help="Dropout rate.")] = 0.2,
    max_len: Annotated[int, typer.Option(min=2, help="Longest history the encoder reads.")] = 200,
    holdout_last: Annotated[
        int,
        typer.Option(
            min=0,
            help="Never train on each user's last N training items: a teacher whose lists a "
            "ranker trains on (--steps-per-user N). Not marked latest.",
        ),
    ] = 0,
    index_kind: Annotated[IndexKind, typer.Option(help="Faiss index built after training.")] = (
        IndexKind.flat
    ),
) -> None:
    """Train with full-softmax cross-entropy, early-stop on validation NDCG@10, export, index."""
    from retriever.train import TrainConfig, train_retriever
    from tandem.data import Dataset
    from tandem.evaluate import render_table
    from tandem.paths import artifacts_root, dataset_dir

    try:
        data = Dataset.load(dataset_dir(dataset))
    except FileNotFoundError as exc:
        fail(str(exc))
    config = TrainConfig(
        model=model.value,
        max_epochs=max_epochs,
        max_minutes=max_minutes,
        patience=patience,
        seed=seed,
        batch_size=batch_size,
        lr=lr,
        hidden=hidden,
        layers=layers,
        dropout=dropout,
        max_len=max_len,
        index_kind=index_kind.value,
        holdout_last=holdout_last,
    )
    try:
        run_dir = train_retriever(data, config, artifacts_root(), progress=True)
    except ValueError as exc:
        fail(str(exc))
    from retriever.evaluation import evaluate_run, store_metrics

    result = evaluate_run(run_dir, "test")
    store_metrics(run_dir, result)
    console.print(render_table(result, title=f"{model.value} test metrics ({run_dir.name})"))
    console.print(f"run saved to {run_dir}")


@app.command()
def index(
    run: Annotated[
        Path | None,
        typer.Argument(help="Run folder or kind folder (its `latest`). Default: latest run."),
    ] = None,
    dataset: Annotated[str, typer.Option(help="Dataset name, used to find the latest run.")] = (
        "ml-100k"
    ),
    kind: Annotated[IndexKind, typer.Option(help="flat = exact; ivf/hnsw for large catalogs.")] = (
        IndexKind.flat
    ),
) -> None:
    """(Re)build the run's Faiss index over item vectors and report its recall@20 vs exact."""
    from retriever.artifacts import build_run_index
    from tandem.artifacts import resolve_run, runs_dir
    from tandem.paths import artifacts_root

    try:
        run_dir = resolve_run(run or runs_dir(artifacts_root(), dataset, "retriever"))
        report = build_run_index(run_dir, kind.value)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    console.print(
        f"{kind.value} index over {report['items']} items written to {run_dir / 'index.faiss'}; "
        f"recall@20 vs exact = {report['recall_at_20_vs_exact']:.4f}"
    )
