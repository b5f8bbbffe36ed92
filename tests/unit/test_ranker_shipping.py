"""A ranker shipped in models/: only serving files, hashes checked, data fingerprint checked."""

from __future__ import annotations

import json

import pytest

from ranker.core import ADAPTER_DIR, CONFIG_FILE
from ranker.shipping import ShippedRankerError, check_shipped, export_run, llm_layers
from tandem.artifacts import Manifest


@pytest.fixture
def run(tmp_path):
    folder = tmp_path / "ranker-1"
    (folder / ADAPTER_DIR).mkdir(parents=True)
    (folder / ADAPTER_DIR / "adapter_config.json").write_text("{}")
    (folder / CONFIG_FILE).write_text("{}")
    (folder / "checkpoint").mkdir()
    (folder / "checkpoint" / "optimizer.safetensors").write_text("big")
    Manifest(kind="ranker", run_id="ranker-1", dataset="ml-100k", config={"llm_dir": "x"},
             data_fingerprint="abc", metrics={"rank_weight": 0.3}).write(folder)  # fmt: skip
    return folder


def test_export_keeps_serving_files_and_the_evaluated_served_weight(run, tmp_path):
    results = {"fused": {"served_weight": 0.0, "valid_gain_ci95": [-0.01, 0.02]}}
    manifest = export_run(run, tmp_path / "models" / "ranker", reproduce="tandem ...",
                          llm_layers=2, results=results)  # fmt: skip
    out = tmp_path / "models" / "ranker"
    assert not (out / "checkpoint").exists() and (out / CONFIG_FILE).is_file()
    assert manifest.metrics["rank_weight"] == 0.0  # the gain was not significant
    assert llm_layers(check_shipped(out, "abc")) == 2
    assert json.loads((out / "manifest.json").read_text())["config"]["reproduce"] == "tandem ..."


def test_a_changed_file_or_other_data_is_refused(run, tmp_path):
    out = tmp_path / "shipped"
    export_run(run, out, reproduce="r", llm_layers=None)
    with pytest.raises(ShippedRankerError, match="trained on data abc"):
        check_shipped(out, "other")
    (out / CONFIG_FILE).write_text('{"tampered": true}')
    with pytest.raises(ShippedRankerError, match="files changed"):
        check_shipped(out, "abc")


def test_the_repository_ships_a_ranker_whose_files_match_its_manifest():
    """What `make run` serves on a fresh clone: unchanged since export, within the size cap."""
    from pathlib import Path

    from ranker.core import Ranker
    from ranker.shipping import MAX_BYTES

    folder = Path(__file__).resolve().parents[2] / "models" / "ranker"
    manifest = Manifest.read(folder)
    assert manifest.verify(folder) == []
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= MAX_BYTES
    llm = Path("artifacts") / "llm-never-read"  # a head ranker loads no LLM
    assert manifest.config["llm"] is not None or Ranker.load(folder, llm).backend.name == "head"
