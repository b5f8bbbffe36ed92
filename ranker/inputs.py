"""The runs a ranker reads besides its LLM: retriever, item embeddings, captions, preferences.

Training records which runs it used in its manifest's ``parents``; evaluation reads them back,
so a ranker is always scored with the features it was trained on. Enrichment outputs are read
by their file contract (safetensors key ``embeddings``; JSONL records ``{item_id, caption}`` and
``{user_id, preference}``), without importing the enrichment package.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ranker.examples import CandidateSource, ItemFeatures
from ranker.train import TrainInputs
from tandem.artifacts import resolve_run, runs_dir
from tandem.data import Dataset

RETRIEVER_KIND = "retriever"
ITEMS_KIND, ITEMS_FILE = "enrichment-items", "item_embeddings.safetensors"
CAPTIONS_KIND, CAPTIONS_FILE = "enrichment-captions", "captions.jsonl"
PREFERENCES_KIND, PREFERENCES_FILE = "enrichment-preferences", "preferences.jsonl"
NONE = "none"  # a CLI value that switches an optional input off


@dataclass(frozen=True)
class InputRuns:
    retriever: Path | None = None
    items: Path | None = None  # None: item soft tokens use the retriever's item table
    captions: Path | None = None
    preferences: Path | None = None

    def to_parents(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_parents(cls, parents: dict[str, str]) -> InputRuns:
        return cls(**{k: Path(v) for k, v in parents.items() if k in cls.__dataclass_fields__})


def _latest(root: Path, dataset: str, kind: str) -> Path | None:
    try:
        return resolve_run(runs_dir(root, dataset, kind))
    except FileNotFoundError:
        return None


def resolve_inputs(
    root: Path,
    dataset: str,
    *,
    retriever: str | Path | None = None,
    items: str | Path | None = None,
    captions: str | Path | None = None,
    preferences: str | Path | None = None,
) -> InputRuns:
    """Given runs (a path, ``"none"``, or None for the newest one) -> run folders."""

    def pick(value: str | Path | None, kind: str) -> Path | None:
        if value is not None and str(value) == NONE:
            return None
        if value is not None:
            return resolve_run(Path(value))
        return _latest(root, dataset, kind)

    found = InputRuns(
        retriever=pick(retriever, RETRIEVER_KIND),
        items=pick(items, ITEMS_KIND),
        captions=pick(captions, CAPTIONS_KIND),
        preferences=pick(preferences, PREFERENCES_KIND),
    )
    if found.retriever is None and str(retriever) != NONE:
        raise FileNotFoundError(
            f"no retriever run under {runs_dir(root, dataset, RETRIEVER_KIND)}: train one with "
            "`tandem retriever train` (or pass --retriever-run)"
        )
    return found


def _jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_item_embeddings(run: Path) -> np.ndarray:
    from safetensors.numpy import load_file

    path = run / ITEMS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run} an item-enrichment run?")
    return load_file(str(path))["embeddings"].astype(np.float32)


def read_captions(run: Path) -> dict[str, str]:
    return {str(r["item_id"]): str(r["caption"]) for r in _jsonl(run / CAPTIONS_FILE)}


def read_preferences(run: Path) -> dict[str, str]:
    return {str(r["user_id"]): str(r["preference"]) for r in _jsonl(run / PREFERENCES_FILE)}


def load_retriever(run: Path):
    try:
        from retriever.core import Retriever
    except ImportError as exc:
        raise FileNotFoundError(f"the retriever package cannot be loaded: {exc}") from exc
    return Retriever.load(run)


def load_inputs(dataset: Dataset, runs: InputRuns) -> TrainInputs:
    """Dataset + features + retriever view, ready for training or evaluation."""
    source = CandidateSource(load_retriever(runs.retriever)) if runs.retriever else None
    if runs.items is not None:
        embeddings = read_item_embeddings(runs.items)
    else:
        embeddings = source.item_table if source is not None else None
    captions = read_captions(runs.captions) if runs.captions else {}
    preferences = read_preferences(runs.preferences) if runs.preferences else {}
    features = ItemFeatures.build(dataset.catalog, captions, embeddings)
    return TrainInputs(dataset, features, source, preferences)
