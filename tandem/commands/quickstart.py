"""``tandem quickstart``: build whatever is missing with small budgets, then serve.

This is what ``make run`` calls on a fresh clone: prepare MovieLens-100K, train the default
retriever, print its test metrics, prepare the base LLM, pick the ranker (a local run, else the
one shipped in ``models/`` after its hash and data checks, else none: retriever order), say
which and why, and start the embedded stack on 127.0.0.1:8000. Steps whose artifacts exist are
skipped, so a second run starts in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path
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
        console.print(f"[1/5] dataset {DATASET}: found in {folder}")
    except FileNotFoundError:
        console.print(f"[1/5] dataset {DATASET}: preparing the bundled MovieLens-100K")
        data = prepare_movielens_100k()
        data.save(folder)

    retriever_runs = runs_dir(artifacts_root(), DATASET, "retriever")
    try:
        run_dir = resolve_run(retriever_runs)
        console.print(f"[2/5] retriever: found {run_dir}")
    except FileNotFoundError:
        from retriever.train import TrainConfig, train_retriever

        config = TrainConfig(max_minutes=retriever_minutes)
        console.print(f"[2/5] retriever: training {config.model} for <= {retriever_minutes} min")
        run_dir = train_retriever(data, config, artifacts_root(), progress=True)

    from retriever.evaluation import evaluate_run, store_metrics
    from tandem.evaluate import render_table

    result = evaluate_run(run_dir, "test")
    store_metrics(run_dir, result)
    console.print(render_table(result, title=f"Retriever {run_dir.name}"))

    ranker_run, llm_dir, layers = _pick_ranker(data, run_dir)
    if llm_dir is not None:
        _ensure_llm(llm_dir, layers)
    elif ranker_run is not None:
        console.print("[4/5] ranker LLM: not needed (a head ranker: a linear model, no LLM)")
    else:
        console.print("[4/5] ranker LLM: not needed (no ranker served)")

    if not serve:
        console.print("[5/5] built; start the service with `tandem serve`")
        return
    if ranker_run is not None:
        os.environ.setdefault("TANDEM_RANKER_RUN", str(ranker_run))
    if llm_dir is not None:
        os.environ.setdefault("TANDEM_LLM_DIR", str(llm_dir))
    console.print(
        f"[5/5] serving on http://{host}:{port} (Ctrl-C stops). Once it logs that start-up is "
        "complete, try:\n"
        f"  curl -s -X POST http://{host}:{port}/recommend -H 'Content-Type: application/json' "
        '-d \'{"user_id": "1", "k": 5}\''
    )
    from tandem.commands.serve import serve as serve_command

    serve_command(host=host, port=port)


def _pick_ranker(
    data, retriever_run: Path | None = None
) -> tuple[Path | None, Path | None, int | None]:
    """[3/5] The ranker to serve and its LLM folder: a local run, else the shipped one, else
    none. Prints which and its validation gain; a ranker whose tuned weight is 0 is named but
    the gateway will not load it (retriever order). A head ranker needs no LLM (None). When
    the shipped ranker was measured beside another run than the served ``retriever_run`` (a
    fresh clone trains its own), says so: the figures hold when that run has the measured
    files (hashes) or those of a retriever recorded beside it, else how to measure the pair."""
    from ranker.core import base_llm_dir
    from ranker.head import is_head_run
    from ranker.shipping import (
        ShippedRankerError,
        check_shipped,
        llm_layers,
        measured_beside,
        measured_beside_files,
        same_retriever_files,
        validation_summary,
    )
    from tandem.artifacts import Manifest, resolve_run, runs_dir
    from tandem.paths import artifacts_root, models_root

    root = artifacts_root()
    try:
        run = resolve_run(runs_dir(root, DATASET, "ranker"))
        manifest = Manifest.read(run)
        llm = None if is_head_run(run) else base_llm_dir(run, root / "llm")
        console.print(f"[3/5] ranker: local run {run.name}: {validation_summary(manifest)}")
        return run, llm, None
    except FileNotFoundError:
        pass
    shipped = models_root() / "ranker"
    if not (shipped / "manifest.json").is_file():
        console.print("[3/5] ranker: none trained or shipped: answers keep the retriever's order")
        return None, None, None
    try:
        manifest = check_shipped(shipped, data.summary.fingerprint)
    except ShippedRankerError as exc:
        console.print(f"[3/5] ranker: shipped one not used ({exc}): retriever order")
        return None, None, None
    summary = validation_summary(manifest)
    if not manifest.metrics.get("rank_weight"):
        console.print(
            f"[3/5] ranker: shipped {shipped} (hashes checked) did not beat the retriever on "
            f"validation ({summary}): not served, answers keep the retriever's order"
        )
        return None, None, None
    layers = llm_layers(manifest)
    llm = None if is_head_run(shipped) else root / (f"llm-{layers}" if layers else "llm")
    console.print(f"[3/5] ranker: shipped {shipped} (hashes checked): {summary}")
    beside = measured_beside(manifest)
    if retriever_run is None or beside is None or beside == retriever_run.name:
        return shipped, llm, layers
    if same_retriever_files(manifest, retriever_run):
        verdict = "the same files (hashes checked): the figures hold here"
    elif (other := measured_beside_files(manifest, retriever_run)) is not None:
        verdict = (
            f"the same files (hashes checked) as retriever {other['retriever']}, beside which "
            f"it was measured at the served weight {other['weight']}: test NDCG@10 "
            f"{other['retriever_ndcg@10']:.4f} (retriever) vs {other['fused_ndcg@10']:.4f} "
            f"(fused), difference interval {other['ndcg10_diff_ci95']}, {other['users']} users"
        )
    else:
        verdict = (
            "beside which its gain is not measured yet: `python benchmarks/ranker_quality.py "
            f"--run {shipped} --retriever-run {retriever_run} --no-ablations --weight "
            f"{manifest.metrics['rank_weight']}` measures it at the served weight"
        )
    console.print(
        f"      measured beside retriever {beside}; this machine serves {retriever_run.name}, "
        + verdict
    )
    return shipped, llm, layers


def _ensure_llm(llm_dir: Path, layers: int | None) -> None:
    """[4/5] The ranker's base LLM, converted (and cut to its layers) once."""
    from ranker.llm import LLMError, prepare_llm

    if (llm_dir / "config.json").is_file():
        console.print(f"[4/5] ranker LLM: found {llm_dir}")
        return
    console.print(
        f"[4/5] ranker LLM: converting the bundled SmolLM2-135M-Instruct GGUF to {llm_dir}"
        + (f" ({layers} layers)" if layers else "")
    )
    try:
        prepare_llm(llm_dir, layers=layers)
    except LLMError as exc:
        fail(str(exc))
