"""``tandem enrich``: jobs run from the CLI; bad input gives a clear error, not a traceback."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tandem.cli import app
from tandem.paths import dataset_dir
from tandem.testing.data import synthetic_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_ARTIFACTS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    synthetic_dataset(num_users=5, num_items=20, min_len=6, max_len=9).save(
        dataset_dir("synthetic")
    )
    return tmp_path


def _run(*args: str):
    return CliRunner().invoke(app, ["enrich", *args])


def test_preferences_command_runs_and_reports_throughput(artifacts, chatty_llm_dir):
    result = _run(
        "preferences", "--dataset", "synthetic", "--llm", str(chatty_llm_dir),
        "--max-users", "3", "--window", "4", "--stride", "2", "--max-new-tokens", "8",
        "--checkpoint-every", "2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "users/minute" in result.output
    [run_dir] = (artifacts / "synthetic" / "enrichment-preferences").glob("preferences-*")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["metrics"]["users"] == 3 and manifest["config"]["window"] == 4


def test_captions_command_writes_a_run(artifacts, chatty_llm_dir):
    result = _run(
        "captions", "--dataset", "synthetic", "--llm", str(chatty_llm_dir), "--max-items", "4",
        "--max-words", "6",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (artifacts / "synthetic" / "enrichment-captions" / "latest").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["preferences", "--dataset", "nope"], "tandem data prepare"),
        (["preferences", "--dataset", "synthetic", "--llm", "/no/such/llm"], "no LLM checkpoint"),
        (["preferences", "--dataset", "synthetic", "--window", "4", "--stride", "9"], "stride"),
        (["items", "--dataset", "synthetic"], "tandem retriever train"),
        (["captions", "--dataset", "synthetic"], "tandem llm prepare"),
    ],
)
def test_bad_input_exits_with_a_clear_message(artifacts, chatty_llm_dir, args, message):
    if "--llm" not in args and args[0] == "preferences" and "nope" not in args:
        args = [*args, "--llm", str(chatty_llm_dir)]
    result = _run(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_an_unreachable_llm_server_is_a_clear_error(artifacts):
    result = _run("preferences", "--dataset", "synthetic", "--llm-url", "http://127.0.0.1:9")
    assert result.exit_code == 2
    assert "is the vLLM server up?" in result.output


def test_items_command_aligns_to_the_retriever_and_saves_a_manifest(
    artifacts, tiny_retriever_run, tiny_text_tower_dir
):
    from enrichment.items import ItemEmbeddings
    from retriever.core import Retriever

    # the fixture's run was trained on the default synthetic dataset: use that catalog
    synthetic_dataset().save(dataset_dir("synthetic"))
    result = _run(
        "items", "--dataset", "synthetic", "--retriever-run", str(tiny_retriever_run),
        "--text-model", str(tiny_text_tower_dir), "--epochs", "3",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    kind = artifacts / "synthetic" / "enrichment-items"
    run_dir = kind / (kind / "latest").read_text().strip()
    items = ItemEmbeddings.load(run_dir / "item_embeddings.safetensors")
    ids = Retriever.load(tiny_retriever_run).item_embeddings()
    assert items.embeddings.shape == ids.shape
    assert items.modality_mask[1:, 0].all() and not items.modality_mask[:, 1].any()  # no images
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["kind"] == "enrichment-items"
    assert manifest["parents"]["retriever"] == str(tiny_retriever_run)
    assert manifest["metrics"]["items_with_text"] == 60
    assert manifest["metrics"]["content_scale_method"] in ("calibrated", "median-norm")
    # the cold items' rows are the calibrated map of their content, fit on probe users
    assert "calibration_level" in manifest["metrics"]
    served_with_items_run_as_cold_slots(artifacts, tiny_retriever_run, run_dir, manifest)


def served_with_items_run_as_cold_slots(artifacts, retriever_run, items_run, manifest) -> None:
    """TANDEM_COLD_SLOTS serves the items run's cold vectors, only for the retriever it was
    made for, and says what to run when there is none."""
    from enrichment.runs import load_cold_slots
    from services.common.retriever import load_retriever
    from services.common.settings import RetrievalSettings

    settings = RetrievalSettings(
        dataset="synthetic", retriever_run=retriever_run, cold_slots=2, items_run=items_run
    )
    served = load_retriever(settings)
    assert served.cold is not None and served.cold.slots == 2
    assert len(served.cold.indices) == manifest["metrics"]["cold_items"]
    with pytest.raises(ValueError, match="made for retriever run"):
        load_cold_slots(items_run, "lrurec-someone-else", 2)
    missing = settings.model_copy(update={"items_run": artifacts / "nowhere"})
    with pytest.raises(FileNotFoundError, match="tandem enrich items"):
        load_retriever(missing)
    off = load_retriever(settings.model_copy(update={"cold_slots": 0}))
    assert off.cold is None
