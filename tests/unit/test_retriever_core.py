"""The Retriever contract serving codes against, on the session's tiny trained run."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from retriever.core import Retriever
from tandem.data import UnknownItemsError


@pytest.fixture(scope="module")
def retriever(tiny_retriever_run: Path) -> Retriever:
    return Retriever.load(tiny_retriever_run)


def test_history_items_are_never_recommended(retriever: Retriever) -> None:
    history = [f"i{n}" for n in range(0, 40, 2)]
    results = retriever.retrieve(history, k=30)
    assert len(results) == 30
    assert not {item for item, _ in results} & set(history)


def test_exclude_is_honoured_and_scores_are_sorted(retriever: Retriever) -> None:
    history = ["i10", "i11", "i12"]
    unrestricted = [item for item, _ in retriever.retrieve(history, k=5)]
    results = retriever.retrieve(history, k=5, exclude=unrestricted[:3])
    items = [item for item, _ in results]
    assert not set(items) & set(unrestricted[:3])
    scores = [score for _, score in results]
    assert scores == sorted(scores, reverse=True)


def test_returns_everything_left_when_almost_all_items_are_excluded(retriever: Retriever) -> None:
    all_ids = retriever.catalog.item_ids
    results = retriever.retrieve(all_ids[:10], k=20, exclude=all_ids[10:57])
    assert sorted(item for item, _ in results) == sorted(all_ids[57:])


def test_padding_and_empty_ids_are_never_returned(retriever: Retriever) -> None:
    results = retriever.retrieve(["i1"], k=retriever.catalog.num_items)
    items = [item for item, _ in results]
    assert len(items) == retriever.catalog.num_items - 1
    assert all(item in retriever.catalog for item in items)


def test_unknown_ids_raise_and_list_them(retriever: Retriever) -> None:
    with pytest.raises(UnknownItemsError) as err:
        retriever.retrieve(["i1", "nope", "i2", "gone"])
    assert err.value.unknown == ["nope", "gone"]
    with pytest.raises(UnknownItemsError) as err:
        retriever.retrieve(["i1"], exclude=["missing"])
    assert err.value.unknown == ["missing"]


def test_empty_history_and_bad_k_are_value_errors(retriever: Retriever) -> None:
    with pytest.raises(ValueError, match="empty history"):
        retriever.retrieve([])
    with pytest.raises(ValueError, match="k must be"):
        retriever.retrieve(["i1"], k=0)
    with pytest.raises(TypeError):
        retriever.retrieve("i1")


def test_only_the_last_max_len_items_shape_the_user_vector(retriever: Retriever) -> None:
    long_history = [f"i{n % 60}" for n in range(3 * retriever.max_len)]
    _, vector = retriever.retrieve_with_user_vector(long_history, k=3)
    tail = long_history[-retriever.max_len :]
    _, tail_vector = retriever.retrieve_with_user_vector(tail, k=3)
    np.testing.assert_allclose(vector, tail_vector, atol=1e-6)


def test_user_vector_matches_batch_user_vectors(retriever: Retriever) -> None:
    history = ["i3", "i4", "i5", "i6"]
    results, vector = retriever.retrieve_with_user_vector(history, k=5)
    assert vector.shape == (retriever.dim,)
    indices = retriever.catalog.index_of(history)
    batch = retriever.user_vectors([indices, indices[:2]])
    np.testing.assert_allclose(batch[0], vector, atol=1e-5)
    scores = retriever.item_embeddings() @ vector
    assert results[0][1] == pytest.approx(
        float(scores[retriever.catalog.index_of([results[0][0]])[0]]), abs=1e-4
    )


def test_onnx_and_torch_engines_agree(tiny_retriever_run: Path, retriever: Retriever) -> None:
    eager = Retriever.load(tiny_retriever_run, engine="torch")
    for history in (["i1"], ["i5", "i6", "i7"], [f"i{n}" for n in range(25)]):
        onnx_items = [item for item, _ in retriever.retrieve(history, k=20)]
        torch_items = [item for item, _ in eager.retrieve(history, k=20)]
        assert onnx_items == torch_items


def test_popular_is_ordered_normalised_and_honours_exclude(retriever: Retriever) -> None:
    top = retriever.popular(5)
    assert top[0][1] == 1.0
    assert [s for _, s in top] == sorted((s for _, s in top), reverse=True)
    excluded = retriever.popular(5, exclude=[top[0][0]])
    assert top[0][0] not in {item for item, _ in excluded}
    assert excluded[0] == top[1]


def test_concurrent_requests_get_the_same_answers(retriever: Retriever) -> None:
    histories = [[f"i{(n + s) % 60}" for s in range(n % 7 + 1)] for n in range(40)]
    expected = [retriever.retrieve(h, k=10) for h in histories]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda h: retriever.retrieve(h, k=10), histories))
    assert got == expected


def test_load_follows_latest_and_round_trips(
    tiny_retriever_run: Path, retriever: Retriever
) -> None:
    again = Retriever.load(tiny_retriever_run.parent)  # the kind folder, via `latest`
    assert again.manifest.run_id == retriever.manifest.run_id
    assert again.retrieve(["i2", "i3"], k=10) == retriever.retrieve(["i2", "i3"], k=10)
    np.testing.assert_array_equal(again.item_embeddings(), retriever.item_embeddings())


def test_modified_artifacts_are_refused(tiny_retriever_run: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(tiny_retriever_run.parent.parent.parent, root)
    run = root / "synthetic" / "retriever" / tiny_retriever_run.name
    with (run / "item_embeddings.safetensors").open("ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(ValueError, match="modified"):
        Retriever.load(run)


def test_a_different_dataset_is_refused(tiny_retriever_run: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(tiny_retriever_run.parent.parent.parent, root)
    summary = root / "synthetic" / "data" / "summary.json"
    data = json.loads(summary.read_text())
    summary.write_text(json.dumps({**data, "fingerprint": "0000"}))
    with pytest.raises(ValueError, match="fingerprint"):
        Retriever.load(root / "synthetic" / "retriever" / tiny_retriever_run.name)
