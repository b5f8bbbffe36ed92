"""The head ranker: a linear listwise head on signal rows, trained, saved, loaded, shipped."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from ranker.core import ADAPTER_DIR, Ranker
from ranker.head import HEAD_FILE, HeadRanker, LinearHead, feature_prompt, is_head_run
from ranker.head_train import (
    HeadTrainConfig,
    ListwiseHead,
    Teacher,
    candidate_rows,
    example_config,
    fit_head,
    train_head,
)
from ranker.inputs import InputRuns, load_inputs
from ranker.llm import load_tokenizer
from ranker.prompts import PromptTokenizer
from ranker.shipping import check_shipped, export_run, llm_layers
from ranker.train_data import ExampleMaker, with_side_features
from tandem.artifacts import Manifest
from tandem.data import Dataset


def planted_lists(n: int, seed: int):
    """Lists of 20 where column 3 of the true candidate is raised and the retriever is blind."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(n, 20, 8)).astype(np.float32)
    labels = rng.integers(0, 20, size=n)
    rows[np.arange(n), labels, 3] += 2.5
    base = np.full((n, 20), -np.log(20.0), dtype=np.float32)
    return rows, base, labels


def test_a_linear_head_learns_a_column_the_retriever_does_not_see():
    rows, base, labels = planted_lists(3000, seed=0)
    module = fit_head(ListwiseHead(8), rows, base, labels, HeadTrainConfig(epochs=5, lr=1e-2))
    head = module.linear()
    assert int(np.argmax(np.abs(head.weight))) == 3
    held_rows, _, held_labels = planted_lists(500, seed=1)
    picked = np.array([np.argmax(head.scores(r)) for r in held_rows])
    assert (picked == held_labels).mean() > 0.5  # chance is 0.05


def test_the_head_round_trips_and_scores_as_log_probabilities(tmp_path: Path):
    head = LinearHead(np.array([1.0, -2.0, 0.5], dtype=np.float32), bias=0.3, scale=0.8)
    head.save(tmp_path / HEAD_FILE)
    loaded = LinearHead.load(tmp_path / HEAD_FILE)
    assert np.allclose(loaded.weight, head.weight) and loaded.scale == pytest.approx(0.8)
    rows = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    assert np.allclose(loaded.scores(rows), (rows @ head.weight + 0.3) / 0.8, atol=1e-5)
    from ranker.head import HeadBackend

    (scores,) = asyncio.run(HeadBackend(loaded).score([feature_prompt(rows)]))
    assert np.exp(scores).sum() == pytest.approx(1.0, abs=1e-5)
    assert list(np.argsort(-scores)) == list(np.argsort(-loaded.scores(rows)))
    with pytest.raises(ValueError, match="3 columns"):
        LinearHead(np.zeros(4, np.float32)).scores(rows)


@pytest.fixture(scope="module")
def served(tiny_retriever_run: Path):
    root = tiny_retriever_run.resolve().parents[2]
    from retriever.core import Retriever

    dataset = Dataset.load(root / Retriever.load(tiny_retriever_run).manifest.dataset / "data")
    return load_inputs(dataset, InputRuns(retriever=tiny_retriever_run))


@pytest.fixture(scope="module")
def head_run(served, tiny_llm_dir: Path, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ranker") / "head-1"
    train_head(
        served, [Teacher(served, holdout_last=3)], PromptTokenizer(load_tokenizer(tiny_llm_dir)),
        run_dir, HeadTrainConfig(epochs=3, ease=False), parents={"retriever": "r"},
    )  # fmt: skip
    return run_dir


def test_training_writes_a_servable_run_with_its_validation(head_run: Path):
    manifest = Manifest.read(head_run)
    assert is_head_run(head_run) and not (head_run / ADAPTER_DIR).exists()
    metrics = manifest.metrics
    assert metrics["examples"] > 0 and metrics["valid_users"] > 0 and metrics["valid_loss"] > 0
    assert "rank_weight" in metrics and len(metrics["valid_gain_ci95"]) == 2
    assert manifest.config["llm_dir"] is None
    ranker = Ranker.load(head_run, Path("no-llm-needed"))  # a head loads no LLM
    assert isinstance(ranker, HeadRanker) and not ranker.config.prompt.reads_retriever_space


def test_served_rows_are_the_rows_it_was_validated_on(head_run: Path, served, tiny_llm_dir):
    """The gateway's rendering (the run's own item table, trends, co-visits) gives the rows the
    training code gave for the same list."""
    config = HeadTrainConfig(ease=False)  # as head_run was trained
    served_rows, trained_rows = _rows_both_ways(head_run, served, tiny_llm_dir, config)
    assert np.allclose(served_rows, trained_rows, atol=1e-5)


def test_demographic_columns_travel_with_the_run(served, tiny_llm_dir, tmp_path: Path):
    """With ``demographics`` the run carries its group table, and the served rows (the user's
    attributes from the request) are again the rows training validated on."""
    from dataclasses import replace

    from ranker.demographics import DEMOGRAPHICS_FILE, WIDTH
    from tandem.data.users import UserProfile, UserProfiles

    ids = served.dataset.interactions.user_ids
    profiles = UserProfiles.from_profiles(
        UserProfile(u, age=20 + 7 * (n % 6), gender="MF"[n % 2], occupation=f"job{n % 3}")
        for n, u in enumerate(ids)
    )
    served = replace(served, dataset=replace(served.dataset, users=profiles))
    config = HeadTrainConfig(epochs=3, demographics=True)
    run_dir = tmp_path / "head-d"
    tokens = PromptTokenizer(load_tokenizer(tiny_llm_dir))
    train_head(served, [Teacher(served, holdout_last=3)], tokens, run_dir, config)
    assert (run_dir / DEMOGRAPHICS_FILE).is_file()
    served_rows, trained_rows = _rows_both_ways(run_dir, served, tiny_llm_dir, config)
    assert np.allclose(served_rows, trained_rows, atol=1e-5)
    plain = ExampleMaker(
        with_side_features(served), example_config(HeadTrainConfig(), 0, 8), tokens
    )
    assert (
        trained_rows.shape[-1]
        == candidate_rows(plain.validation_set().layouts[0]).shape[-1] + WIDTH
    )


def test_ease_columns_travel_with_the_run_and_its_shipped_copy(
    head_run: Path, served, tiny_llm_dir, tmp_path: Path
):
    """With ``ease`` the run carries its co-occurrence table; the copy ``tandem ranker export``
    ships carries it too (an exported run once lost a table), and serves the validated rows."""
    from ranker.ease import EASE_FILE

    config = HeadTrainConfig(epochs=3, ease=True)
    run_dir = tmp_path / "head-e"
    tokens = PromptTokenizer(load_tokenizer(tiny_llm_dir))
    train_head(served, [Teacher(served, holdout_last=3)], tokens, run_dir, config)
    shipped = tmp_path / "models" / "ranker"
    export_run(run_dir, shipped, reproduce="tandem ranker train-head --ease ...", llm_layers=None)
    assert (shipped / EASE_FILE).is_file()
    served_rows, trained_rows = _rows_both_ways(shipped, served, tiny_llm_dir, config)
    assert np.allclose(served_rows, trained_rows, atol=1e-5)
    narrower, _ = _rows_both_ways(head_run, served, tiny_llm_dir, HeadTrainConfig(ease=False))
    assert trained_rows.shape[-1] == narrower.shape[-1] + 1  # the same run without EASE


def _rows_both_ways(run_dir: Path, served, tiny_llm_dir, config: HeadTrainConfig):
    """The first validation list's rows as the served ``HeadRanker`` renders them from a
    request's fields, and as training rendered them."""
    from ranker.demographics import attributes_of
    from ranker.examples import prompt_input

    maker = ExampleMaker(
        with_side_features(served), example_config(config, 0, 8),
        PromptTokenizer(load_tokenizer(tiny_llm_dir)),
    )  # fmt: skip
    layouts = maker.validation_set().layouts
    ranker = HeadRanker.load(run_dir)
    split = served.dataset.split()
    order = np.random.default_rng(1).permutation(split.num_users)
    user = next(u for u in order if int(split.valid_target[u]) in _top(served, split, u))
    history = split.valid_inputs()[user]
    vector = served.source.user_vectors([history])[0]
    top, _ = served.source.top_k([history], 20, vector[None, :])
    user_id = served.dataset.interactions.user_ids[user]
    inp = prompt_input(
        served.features, history, top[0], None, vector, served.source.scores(vector, top[0]),
        float(served.dataset.interactions.timestamps()[user][len(history) - 1]),
        attributes_of(served.dataset.profile(user_id)),
    )  # fmt: skip
    return ranker.rows(inp), candidate_rows(layouts[0])


def _top(served, split, user) -> set[int]:
    history = split.valid_inputs()[user]
    vector = served.source.user_vectors([history])
    return set(served.source.top_k([history], 20, vector)[0][0].tolist())


def test_a_teacher_must_hold_out_a_tail(served, tiny_llm_dir, tmp_path: Path):
    with pytest.raises(ValueError, match="--holdout-last"):
        train_head(served, [Teacher(served, 0)], PromptTokenizer(load_tokenizer(tiny_llm_dir)),
                   tmp_path / "head")  # fmt: skip


def test_a_head_ships_without_an_adapter_or_llm(head_run: Path, tmp_path: Path):
    out = tmp_path / "models" / "ranker"
    export_run(head_run, out, reproduce="tandem ranker train-head ...", llm_layers=None)
    manifest = check_shipped(out, Manifest.read(head_run).data_fingerprint)
    assert (out / HEAD_FILE).is_file() and is_head_run(out)
    assert manifest.config["llm"] is None and llm_layers(manifest) is None
    assert isinstance(Ranker.load(out, Path("no-llm-needed")), HeadRanker)


@pytest.fixture
def ship(head_run: Path, tmp_path: Path, monkeypatch):
    """``ship(served_weight, measured_beside)`` exports ``head_run`` as the shipped ranker
    (no local run exists) and returns the dataset stand-in quickstart checks it against."""
    monkeypatch.setenv("TANDEM_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    monkeypatch.setenv("TANDEM_MODELS_DIR", str(tmp_path / "models"))
    fingerprint = Manifest.read(head_run).data_fingerprint
    data = type("Data", (), {"summary": type("Summary", (), {"fingerprint": fingerprint})})

    def export(
        served_weight: float = 0.4,
        measured_beside: str | None = None,
        retriever_files: dict[str, str] | None = None,
        beside: tuple[dict, ...] = (),
    ):
        fused = {"weight": 0.4, "served_weight": served_weight, "valid_gain_ci95": [0.01, 0.05],
                 "valid_users": 943, "ndcg@10": 0.12}  # fmt: skip
        results = {"fused": fused, "retriever": {"ndcg@10": 0.11}, "users": 943}
        if measured_beside:
            results["inputs"] = {"retriever": f"artifacts/ml-100k/retriever/{measured_beside}"}
        if retriever_files:
            results["retriever_files"] = retriever_files
        export_run(head_run, tmp_path / "models" / "ranker", reproduce="r", llm_layers=None,
                   results=results, beside=beside)  # fmt: skip
        return data

    return export


@pytest.fixture
def retriever_files_run(tmp_path: Path):
    """``make(name, weights)``: a retriever run folder whose one file holds ``weights``."""

    def make(name: str, weights: bytes) -> Path:
        run = tmp_path / "retriever" / name
        run.mkdir(parents=True)
        (run / "model.safetensors").write_bytes(weights)
        Manifest("retriever", name, "ml-100k", {}, "fp").write(run)
        return run

    return make


def test_quickstart_serves_a_shipped_head_that_passed_validation_without_an_llm(ship, tmp_path):
    from tandem.commands.quickstart import _pick_ranker

    assert _pick_ranker(ship()) == (tmp_path / "models" / "ranker", None, None)
    # its validation gain was not real: not served
    assert _pick_ranker(ship(served_weight=0.0)) == (None, None, None)


def test_quickstart_says_when_the_shipped_head_was_measured_beside_another_retriever(
    ship, tmp_path: Path, capsys
):
    from tandem.commands.quickstart import _pick_ranker

    data = ship(measured_beside="lrurec-measured")
    capsys.readouterr()
    _pick_ranker(data, tmp_path / "retriever" / "lrurec-measured")
    same = " ".join(capsys.readouterr().out.split())
    _pick_ranker(data, tmp_path / "retriever" / "lrurec-fresh")
    other = " ".join(capsys.readouterr().out.split())

    assert "0.1100 (retriever lrurec-measured) vs 0.1200 (fused)" in same
    assert "measured beside" not in same
    assert "measured beside retriever lrurec-measured; this machine serves lrurec-fresh" in other
    assert "--retriever-run" in other


def test_quickstart_recognises_a_rebuilt_retriever_by_its_file_hashes(
    ship, retriever_files_run, capsys
):
    """A deterministic rebuild of the measured retriever has a new run id but the same files:
    the shipped figures hold for it. Another model, same name pattern, does not pass."""
    from tandem.commands.quickstart import _pick_ranker

    retriever = retriever_files_run
    measured = retriever("lrurec-measured", b"weights")
    data = ship(measured_beside=measured.name, retriever_files=Manifest.read(measured).files)
    capsys.readouterr()
    _pick_ranker(data, retriever("lrurec-rebuilt", b"weights"))
    rebuilt = " ".join(capsys.readouterr().out.split())
    _pick_ranker(data, retriever("lrurec-other", b"other weights"))
    other = " ".join(capsys.readouterr().out.split())

    assert "serves lrurec-rebuilt, the same files (hashes checked): the figures hold" in rebuilt
    assert "--retriever-run" not in rebuilt
    assert "serves lrurec-other, beside which its gain is not measured yet" in other


def _beside_report(run: Path, fixed_weight: float) -> dict:
    """What ``ranker_quality.py --retriever-run RUN --weight W`` records (the parts shipped)."""
    fused = {"weight": 0.6, "fixed_weight": fixed_weight, "ndcg@10": 0.1306}
    return {
        "inputs": {"retriever": str(run)}, "retriever_files": Manifest.read(run).files,
        "users": 943, "retriever": {"ndcg@10": 0.1116}, "fused": fused,
        "ndcg10_diff_ci95": [0.0067, 0.0311],
    }  # fmt: skip


def test_quickstart_reports_the_figures_measured_beside_a_second_retriever(
    ship, retriever_files_run, capsys
):
    """Hosts train one of two retrievers from the same command; the shipped ranker measured
    beside both (at its served weight) reports, on each, the figures of the pair it serves."""
    from tandem.commands.quickstart import _pick_ranker

    measured = retriever_files_run("lrurec-measured", b"weights")
    second = retriever_files_run("lrurec-second", b"second weights")
    data = ship(
        measured_beside=measured.name,
        retriever_files=Manifest.read(measured).files,
        beside=(_beside_report(second, fixed_weight=0.4),),
    )
    capsys.readouterr()
    _pick_ranker(data, retriever_files_run("lrurec-second-rebuilt", b"second weights"))
    rebuilt = " ".join(capsys.readouterr().out.split())
    _pick_ranker(data, retriever_files_run("lrurec-third", b"third weights"))
    third = " ".join(capsys.readouterr().out.split())

    assert "the same files (hashes checked) as retriever lrurec-second" in rebuilt
    assert "at the served weight 0.4: test NDCG@10 0.1116 (retriever) vs 0.1306 (fused)" in rebuilt
    assert "--retriever-run" not in rebuilt
    assert "serves lrurec-third, beside which its gain is not measured yet" in third


def test_export_refuses_figures_beside_a_retriever_measured_at_another_weight(
    ship, retriever_files_run
):
    from ranker.shipping import ShippedRankerError

    second = retriever_files_run("lrurec-second", b"second weights")
    with pytest.raises(ShippedRankerError, match=r"measured at weight 0\.6.*--weight 0\.4"):
        ship(beside=(_beside_report(second, fixed_weight=0.6),))


def test_the_cli_trains_from_a_teacher_and_refuses_one_without_a_held_out_tail(
    tiny_retriever_run: Path, tiny_llm_dir: Path, tmp_path: Path, monkeypatch
):
    import shutil

    from typer.testing import CliRunner

    from tandem.cli import app

    root = tmp_path / "artifacts"
    shutil.copytree(tiny_retriever_run.parent.parent.parent, root)
    monkeypatch.setenv("TANDEM_ARTIFACTS_DIR", str(root))
    served = root / "synthetic" / "retriever" / tiny_retriever_run.name
    args = ["ranker", "train-head", "--dataset", "synthetic", "--retriever-run", str(served),
            "--llm", str(tiny_llm_dir), "--epochs", "2", "--threads", "1"]  # fmt: skip
    refused = CliRunner().invoke(app, [*args, "--teacher-run", str(served)])
    assert refused.exit_code == 2 and "--holdout-last" in refused.output
    teacher = served.with_name("teacher")  # as if trained with --holdout-last 3
    shutil.copytree(served, teacher)
    manifest = Manifest.read(teacher)
    manifest.config["train"]["holdout_last"] = 3
    manifest.write(teacher)
    result = CliRunner().invoke(app, [*args, "--teacher-run", str(teacher)])
    assert result.exit_code == 0, result.output
    (run,) = (root / "synthetic" / "ranker").glob("head-*")
    assert Manifest.read(run).parents["teachers"] == str(teacher) and is_head_run(run)


def test_an_evaluation_beside_another_retriever_is_not_stored_in_the_run(
    head_run: Path, tiny_retriever_run: Path, tmp_path: Path, monkeypatch
):
    """The run's manifest keeps its own evaluation: a report made with another retriever goes
    to its JSON file only."""
    import json

    from ranker.evaluation import evaluate_two_stage
    from retriever.core import Retriever

    monkeypatch.setenv("TANDEM_ARTIFACTS_DIR", str(tiny_retriever_run.resolve().parents[2]))
    before = (head_run / "manifest.json").read_text()
    report = evaluate_two_stage(
        head_run, Retriever.load(tiny_retriever_run).manifest.dataset, "valid",
        tmp_path / "report.json", ablations=False, mapb_users=0, fusion_users=8,
        retriever_run=tiny_retriever_run,
    )  # fmt: skip
    assert (head_run / "manifest.json").read_text() == before and "stored_in" not in report
    assert report["retriever_files"] == Manifest.read(tiny_retriever_run).files
    assert json.loads((tmp_path / "report.json").read_text())["fused"]["ndcg@10"] >= 0


def test_a_re_export_keeps_the_figures_beside_other_retrievers_while_the_weight_stays(
    ship, retriever_files_run, tmp_path: Path
):
    second = retriever_files_run("lrurec-second", b"second weights")
    ship(beside=(_beside_report(second, fixed_weight=0.4),))
    shipped = tmp_path / "models" / "ranker"
    results = Manifest.read(shipped).metrics["results"]

    export_run(shipped, shipped, reproduce="r", llm_layers=None, results=results)
    kept = Manifest.read(shipped).metrics["measured_beside"]
    results["fused"]["served_weight"] = 0.5  # a new evaluation serves another weight
    export_run(shipped, shipped, reproduce="r", llm_layers=None, results=results)

    assert [entry["retriever"] for entry in kept] == ["lrurec-second"]
    assert "measured_beside" not in Manifest.read(shipped).metrics
