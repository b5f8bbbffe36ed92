"""``tandem data``: prepare a dataset (MovieLens-100K or your own files) for training."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tandem.console import console, fail

app = typer.Typer(
    help="Prepare datasets: load, validate, filter, and save as Parquet.", no_args_is_help=True
)


@app.command()
def prepare(
    dataset: Annotated[
        str, typer.Option(help="'ml-100k' (bundled), or a name for your own --interactions file.")
    ] = "ml-100k",
    interactions: Annotated[
        Path | None,
        typer.Option(help="Your interactions CSV/Parquet: user_id,item_id,timestamp[,rating]."),
    ] = None,
    items: Annotated[
        Path | None,
        typer.Option(
            help="Optional items CSV/Parquet: item_id,title[,year,genres,text,image_path]."
        ),
    ] = None,
    users: Annotated[
        Path | None,
        typer.Option(
            help="Optional users CSV/Parquet (side features): "
            "user_id[,age,gender,occupation,zip_code]; empty cells are missing values."
        ),
    ] = None,
    min_interactions: Annotated[
        int, typer.Option(min=3, help="Drop users with fewer interactions than this.")
    ] = 5,
) -> None:
    """Load, validate and save a dataset under artifacts/<dataset>/data/."""
    from tandem.data import DataFormatError, prepare_files, prepare_movielens_100k
    from tandem.paths import dataset_dir

    if users is not None and interactions is None:
        fail("--users goes with --interactions (ml-100k brings its own users file)")
    try:
        if interactions is not None:
            data = prepare_files(dataset, interactions, items, min_interactions, users)
        elif dataset == "ml-100k":
            data = prepare_movielens_100k(min_interactions)
        else:
            fail(
                f"dataset {dataset!r} is not bundled: pass --interactions (and optionally "
                "--items and --users)"
            )
    except (DataFormatError, FileNotFoundError) as exc:
        fail(str(exc))
    folder = dataset_dir(dataset)
    data.save(folder)
    summary = data.summary
    table = Table(title=f"Prepared {summary.name}", show_header=False)
    for label, value in (
        ("users", summary.users),
        ("items", summary.items),
        ("interactions", summary.interactions),
        (f"users dropped (< {min_interactions} interactions)", summary.dropped_users),
        ("interactions dropped with them", summary.dropped_interactions),
        ("interactions with unknown items", summary.unknown_item_interactions),
        ("users with side features", summary.profiles),
        ("fingerprint", summary.fingerprint),
        ("saved to", str(folder)),
    ):
        table.add_row(label, str(value))
    console.print(table)
