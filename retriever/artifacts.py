"""A retriever run on disk: what ``tandem retriever train`` writes and serving reads.

``artifacts/<dataset>/retriever/<run-id>/`` holds ``model.safetensors`` (encoder weights),
``item_embeddings.safetensors`` (the tied item table, row 0 padding), ``item_popularity
.safetensors`` (training interaction counts, for cold users), ``user_encoder.onnx``,
``index.faiss`` and ``manifest.json`` (model type and config, data fingerprint, metrics, file
hashes). The catalog is not copied: it is loaded from the prepared dataset the manifest names,
and its fingerprint must match.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

from retriever.index import INDEX_FILE, IndexConfig, ItemIndex, recall_against_exact
from retriever.models import SequenceEncoder, build_model, config_dict
from retriever.onnx import export_user_encoder
from retriever.scoring import encode_histories
from tandem.artifacts import Manifest, mark_latest, new_run_id, runs_dir
from tandem.data import Dataset, LeaveOneOutSplit
from tandem.paths import dataset_dir

if TYPE_CHECKING:
    from retriever.train import FitReport, TrainConfig

KIND = "retriever"
MODEL_FILE = "model.safetensors"
ITEM_EMBEDDINGS_FILE = "item_embeddings.safetensors"
POPULARITY_FILE = "item_popularity.safetensors"
ONNX_FILE = "user_encoder.onnx"


def save_run(
    model: SequenceEncoder,
    dataset: Dataset,
    split: LeaveOneOutSplit,
    config: TrainConfig,
    report: FitReport,
    run_root: Path,
    *,
    latest: bool = True,
) -> Path:
    """Write every artifact of a fitted model, then the manifest, then mark the run latest
    (unless ``latest`` is off)."""
    run_dir = runs_dir(run_root, dataset.name, KIND) / new_run_id(config.model)
    run_dir.mkdir(parents=True, exist_ok=False)
    model = model.eval()
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    save_torch(state, str(run_dir / MODEL_FILE))
    items = model.item_embeddings().detach().float().numpy()
    save_numpy({"item_embeddings": items}, str(run_dir / ITEM_EMBEDDINGS_FILE))
    counts = np.bincount(np.concatenate(split.train), minlength=dataset.catalog.num_items + 1)
    save_numpy({"counts": counts.astype(np.int64)}, str(run_dir / POPULARITY_FILE))
    export_user_encoder(model, run_dir / ONNX_FILE)
    manifest = Manifest(
        kind=KIND,
        run_id=run_dir.name,
        dataset=dataset.name,
        config={
            "model": config.model,
            "model_config": config_dict(model),
            "num_items": dataset.catalog.num_items,
            "dim": model.hidden,
            "train": asdict(config),
        },
        data_fingerprint=dataset.summary.fingerprint,
        metrics={
            "valid": report.best_valid,
            "fit": {k: v for k, v in report.to_dict().items() if k != "best_valid"},
        },
    )
    queries = encode_histories(model, split.valid_inputs()[:256])
    _write_index(run_dir, manifest, items, IndexConfig(kind=config.index_kind), queries)
    if latest:
        mark_latest(run_dir)
    return run_dir


def _write_index(
    run_dir: Path, manifest: Manifest, items: np.ndarray, config: IndexConfig, queries: np.ndarray
) -> dict[str, Any]:
    index = ItemIndex.build(items, config)
    index.save(run_dir / INDEX_FILE)
    report = {
        "items": index.num_items,
        "recall_at_20_vs_exact": recall_against_exact(index, queries, k=20),
    }
    manifest.config["index"] = config.to_dict()
    manifest.metrics["index"] = report
    manifest.write(run_dir)
    return report


def build_run_index(run_dir: Path, kind: str = "flat", **options: Any) -> dict[str, Any]:
    """(Re)build ``index.faiss`` of a finished run; returns item count and recall@20 vs exact.

    Recall is measured with the user vectors of (up to) 256 validation histories.
    """
    manifest = read_manifest(run_dir)
    items = load_item_embeddings(run_dir)
    model = load_model(run_dir, manifest)
    dataset = load_run_dataset(run_dir, manifest)
    queries = encode_histories(model, dataset.split().valid_inputs()[:256])
    return _write_index(run_dir, manifest, items, IndexConfig(kind=kind, **options), queries)


def read_manifest(run_dir: Path) -> Manifest:
    manifest = Manifest.read(run_dir)
    if manifest.kind != KIND:
        raise ValueError(f"{run_dir} is a {manifest.kind!r} run, not a retriever run")
    return manifest


def load_model(run_dir: Path, manifest: Manifest) -> SequenceEncoder:
    """The trained encoder in eval mode."""
    config = manifest.config
    model = build_model(config["model"], config["num_items"], config["model_config"])
    model.load_state_dict(load_torch(str(run_dir / MODEL_FILE)))
    return model.eval()


def load_item_embeddings(run_dir: Path) -> np.ndarray:
    return load_numpy(str(run_dir / ITEM_EMBEDDINGS_FILE))["item_embeddings"]


def load_popularity(run_dir: Path) -> np.ndarray:
    return load_numpy(str(run_dir / POPULARITY_FILE))["counts"]


def load_run_dataset(run_dir: Path, manifest: Manifest) -> Dataset:
    """The prepared dataset the run was trained on, checked against the manifest fingerprint.

    Looked up beside the run first (``<root>/<dataset>/data``, the layout ``tandem`` writes),
    then under ``$TANDEM_ARTIFACTS_DIR``.
    """
    candidates = [run_dir.resolve().parent.parent / "data", dataset_dir(manifest.dataset)]
    folder = next((c for c in candidates if (c / "summary.json").is_file()), None)
    if folder is None:
        raise FileNotFoundError(
            f"prepared dataset {manifest.dataset!r} not found (looked in "
            f"{', '.join(str(c) for c in candidates)}): run `tandem data prepare`"
        )
    dataset = Dataset.load(folder)
    if dataset.summary.fingerprint != manifest.data_fingerprint:
        raise ValueError(
            f"dataset in {folder} has fingerprint {dataset.summary.fingerprint} but run "
            f"{manifest.run_id} was trained on {manifest.data_fingerprint}: item ids would not "
            "line up; retrain the retriever or restore that dataset"
        )
    return dataset
