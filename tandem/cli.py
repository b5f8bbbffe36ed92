"""The ``tandem`` command line. Stage packages are imported lazily inside commands."""

from __future__ import annotations

import typer

from tandem.commands import (
    data,
    enrich,
    evaluate,
    events,
    features,
    llm,
    quickstart,
    ranker,
    ranker_head,
    ranker_runs,
    retriever,
    serve,
    variants,
    vllm,
)

app = typer.Typer(
    name="tandem",
    help="Tandem: a two-stage recommender (sequential retrieval + LLM ranking).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(data.app, name="data")
app.add_typer(retriever.app, name="retriever")
app.add_typer(llm.app, name="llm")
ranker.app.command("train-head")(ranker_head.train_head)
ranker.app.command("evaluate")(ranker_runs.evaluate)
ranker.app.command("export")(ranker_runs.export)
app.add_typer(ranker.app, name="ranker")
app.add_typer(features.app, name="features")
app.add_typer(enrich.app, name="enrich")
app.add_typer(events.app, name="events")
app.add_typer(vllm.app, name="vllm")
app.add_typer(variants.app, name="variants")
app.command("evaluate")(evaluate.evaluate)
app.command("serve")(serve.serve)
app.command("quickstart")(quickstart.quickstart)

if __name__ == "__main__":
    app()
