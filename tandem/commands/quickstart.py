"""``tandem quickstart``: build whatever is missing with small budgets, then serve.

This is what ``make run`` calls on a fresh clone: prepare MovieLens-100K, train the default
retriever, print its test metrics, prepare the base LLM, and start the embedded stack on
127.0.0.1:8000. Steps whose artifacts exist are skipped, so a second run starts in seconds.
"""

from __future__ import annotations

from typing import Annotated

import typer

from tandem.console import console, fail

DATASET = "ml-100k"


def quickstart(
    retriever_minutes: Annotated[
        float, typer.Option(min=0.5, help="Training budget for the retriever when one is missing.")
    ] = 8.0,
    serve: Annotated[
        bool, typer.Option(help="Start the service at the end (--no-serve: build only).")
    ] = True,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to bind.")] = 8000,
) -> None:
    """Prepare data, train and evaluate the retriever, prepare the LLM, then serve /recommend."""
    from tandem.artifacts import resolve_run, runs_dir
    from tandem.data import Dataset, prepare_movielens_100k
    from tandem.paths import artifacts_root, dataset_dir

    folder = dataset_dir(DATASET)
    try:
        data = Dataset.load(folder)
        console.print(f"[1/4] dataset {DATASET}: found in {folder}")
    except FileNotFoundError:
        console.print(f"[1/4] dataset {DATASET}: preparing the bundled MovieLens-100K")
        data = prepare_movielens_100k()
        data.save(folder)

    retriever_runs = runs_dir(artifacts_root(), DATASET, "retriever")
    try:
        run_dir = resolve_run(retriever_runs)
        console.print(f"[2/4] retriever: found {run_dir}")
    except FileNotFoundError:
        from retriever.train import TrainConfig, train_retriever

        config = TrainConfig(max_minutes=retriever_minutes)
        console.print(f"[2/4] retriever: training {config.model} for <= {retriever_minutes} min")
        run_dir = train_retriever(data, config, artifacts_root(), progress=True)

    from retriever.evaluation import evaluate_run, store_metrics
    from tandem.evaluate import render_table

    result = evaluate_run(run_dir, "test")
    store_metrics(run_dir, result)
    console.print(render_table(result, title=f"Retriever {run_dir.name}"))

    llm_dir = artifacts_root() / "llm"
    if (llm_dir / "config.json").is_file():
        console.print(f"[3/4] ranker LLM: found {llm_dir}")
    else:
        from ranker.llm import LLMError, prepare_llm

        console.print("[3/4] ranker LLM: converting the bundled SmolLM2-135M-Instruct GGUF")
        try:
            prepare_llm(llm_dir)
        except LLMError as exc:
            fail(str(exc))

    if not serve:
        console.print("[4/4] built; start the service with `tandem serve`")
        return
    console.print(
        f"[4/4] serving on http://{host}:{port} (Ctrl-C stops). Once it logs that start-up is "
        "complete, try:\n"
        f"  curl -s -X POST http://{host}:{port}/recommend -H 'Content-Type: application/json' "
        "-d '{\"user_id\": \"1\", \"k\": 5}'"
    )
    from tandem.commands.serve import serve as serve_command

    serve_command(host=host, port=port)
