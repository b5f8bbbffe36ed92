"""``tandem retriever train|index`` and ``tandem evaluate`` through the real Typer app."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tandem.artifacts import Manifest
from tandem.cli import app
from tandem.testing.data import synthetic_dataset

runner = CliRunner()


@pytest.fixture
def run_copy(tiny_retriever_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the session run (these commands rewrite index and manifest)."""
    root = tmp_path / "artifacts"
    shutil.copytree(tiny_retriever_run.parent.parent.parent, root)
    monkeypatch.setenv("TANDEM_ARTIFACTS_DIR", str(root))
    return root / "synthetic" / "retriever" / tiny_retriever_run.name


def test_train_writes_a_complete_run_and_prints_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TANDEM_ARTIFACTS_DIR", str(tmp_path))
    dataset = synthetic_dataset()
    dataset.save(tmp_path / "synthetic" / "data")
    args = ["retriever", "train", "--dataset", "synthetic", "--model", "sasrec", "--max-len", "20"]
    args += ["--hidden", "16", "--layers", "1", "--max-epochs", "1", "--lr", "0.01"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "test" in result.output and "NDCG" in result.output
    kind_dir = tmp_path / "synthetic" / "retriever"
    run = kind_dir / (kind_dir / "latest").read_text().strip()
    names = {p.name for p in run.iterdir()}
    assert {"model.safetensors", "item_embeddings.safetensors", "user_encoder.onnx"} <= names
    assert {"index.faiss", "manifest.json"} <= names
    manifest = Manifest.read(run)
    assert manifest.kind == "retriever" and manifest.config["model"] == "sasrec"
    assert manifest.data_fingerprint == dataset.summary.fingerprint
    assert {"valid", "test", "fit", "index"} <= set(manifest.metrics)
    assert manifest.verify(run) == []


def test_index_rebuilds_with_another_kind(run_copy: Path) -> None:
    result = runner.invoke(app, ["retriever", "index", str(run_copy), "--kind", "hnsw"])
    assert result.exit_code == 0, result.output
    assert "recall@20" in result.output
    manifest = Manifest.read(run_copy)
    assert manifest.config["index"]["kind"] == "hnsw"
    assert manifest.verify(run_copy) == []


def test_evaluate_prints_stores_and_writes_json(run_copy: Path, tmp_path: Path) -> None:
    out = tmp_path / "metrics.json"
    result = runner.invoke(
        app, ["evaluate", "--dataset", "synthetic", "--split", "valid", "--json-out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "Recall" in result.output
    written = json.loads(out.read_text())
    assert written["split"] == "valid" and written["users"] == 40
    stored = Manifest.read(run_copy).metrics["valid"]
    assert stored["ndcg@10"] == pytest.approx(written["metrics"]["ndcg@10"])


def test_missing_dataset_or_run_is_a_clean_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TANDEM_ARTIFACTS_DIR", str(tmp_path))
    result = runner.invoke(app, ["retriever", "train", "--dataset", "nowhere"])
    assert result.exit_code == 2
    assert "tandem data prepare" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    result = runner.invoke(app, ["evaluate", "--run", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "tandem retriever train" in result.output
    result = runner.invoke(app, ["retriever", "index", str(tmp_path / "nope")])
    assert result.exit_code == 2


@pytest.mark.skipif(
    importlib.util.find_spec("ranker.evaluation") is not None,
    reason="the ranker provides stage two",
)
def test_two_stage_without_a_ranker_says_what_is_missing() -> None:
    result = runner.invoke(app, ["evaluate", "--stage", "two"])
    assert result.exit_code == 2
    assert "ranker" in result.output


def test_cli_defaults_match_the_train_config() -> None:
    import inspect

    from retriever.train import TrainConfig
    from tandem.commands.retriever import train

    defaults = TrainConfig()
    for name, parameter in inspect.signature(train).parameters.items():
        value = getattr(parameter.default, "value", parameter.default)
        if name == "model":
            assert value == defaults.model
        elif hasattr(defaults, name):
            assert value == getattr(defaults, name), name
