"""The data layer: loaders, validation errors, filtering, ordering and the split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from tandem.cli import app
from tandem.data import (
    Catalog,
    DataFormatError,
    Dataset,
    UnknownItemsError,
    build_dataset,
    leave_one_out,
    prepare_files,
    prepare_movielens_100k,
)
from tandem.data.movielens import clean_title


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Toy Story (1995)", ("Toy Story", 1995)),
        ("Usual Suspects, The", ("The Usual Suspects", None)),
        ("Usual Suspects, The (1995)", ("The Usual Suspects", 1995)),
        ("Seven (Se7en)", ("Seven (Se7en)", None)),
        ("Postino, Il", ("Il Postino", None)),
    ],
)
def test_movielens_titles_are_cleaned_for_prompts(raw: str, expected: tuple) -> None:
    assert clean_title(raw) == expected


def test_bundled_movielens_has_the_published_size() -> None:
    data = prepare_movielens_100k()
    assert (data.summary.users, data.summary.items, data.summary.interactions) == (
        943,
        1682,
        100_000,
    )
    assert data.catalog.row(1)["title"] == "Toy Story"
    assert data.catalog.row(1)["genres"] == ("Animation", "Children's", "Comedy")
    assert "unknown" not in {g for gs in data.catalog.frame["genres"] for g in gs}


def test_catalog_maps_ids_both_ways_and_lists_unknown_ids() -> None:
    catalog = Catalog.from_records(["a", "b", "c"], ["A", "B", "C"])
    assert catalog.index_of(["c", "a"]).tolist() == [3, 1]
    assert catalog.id_of([1, 3]) == ["a", "c"]
    with pytest.raises(UnknownItemsError) as info:
        catalog.index_of(["a", "x", "y"])
    assert info.value.unknown == ["x", "y"]
    with pytest.raises(IndexError):
        catalog.id_of([0])


def test_equal_timestamps_keep_file_order(tmp_path: Path) -> None:
    rows = "user_id,item_id,timestamp\n" + "".join(
        f"u1,{item},100\n" for item in ["z", "a", "m", "b", "c"]
    )
    data = prepare_files("t", write_csv(tmp_path / "i.csv", rows))
    assert data.catalog.id_of(data.interactions.sequences()[0]) == ["z", "a", "m", "b", "c"]


def test_sequences_are_ordered_by_time_within_each_user(tmp_path: Path) -> None:
    text = "user_id,item_id,timestamp\n" + "".join(
        f"{u},{i},{t}\n" for u, i, t in [("u2", "x", 5), ("u1", "b", 3), ("u1", "a", 1)]
    )
    text += "".join(f"u{u},f{n},{10 + n}\n" for u in (1, 2) for n in range(4))
    data = prepare_files("t", write_csv(tmp_path / "i.csv", text))
    first = data.catalog.id_of(data.interactions.sequences()[0])
    assert first[:2] == ["a", "b"]
    assert data.interactions.timestamps()[0].tolist() == [1, 3, 10, 11, 12, 13]  # aligned


def test_users_below_min_interactions_are_dropped_and_counted(tmp_path: Path) -> None:
    lines = [f"keep,i{n},{n}" for n in range(5)] + [f"drop,i{n},{n}" for n in range(4)]
    path = write_csv(tmp_path / "i.csv", "user_id,item_id,timestamp\n" + "\n".join(lines))
    data = prepare_files("t", path, min_interactions=5)
    assert data.interactions.user_ids == ["keep"]
    assert (data.summary.dropped_users, data.summary.dropped_interactions) == (1, 4)


@pytest.mark.parametrize(
    ("text", "column", "row"),
    [
        ("user_id,item_id,timestamp\nu1,i1,10\nu1,i2,yesterday\n", "timestamp", 2),
        ("user_id,item_id,timestamp\nu1,i1,10\nu1,,11\n", "item_id", 2),
        ("user_id,item_id,timestamp\nu1,i1,10.5\n", "timestamp", 1),
        ("user_id,item_id,timestamp,rating\nu1,i1,10,great\n", "rating", 1),
    ],
)
def test_bad_interaction_files_name_file_column_and_row(
    tmp_path: Path, text: str, column: str, row: int
) -> None:
    path = write_csv(tmp_path / "bad.csv", text)
    with pytest.raises(DataFormatError) as info:
        prepare_files("t", path)
    assert (info.value.column, info.value.row) == (column, row)
    assert str(path) in str(info.value)


def test_missing_columns_are_reported(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "bad.csv", "user,item,time\nu1,i1,1\n")
    with pytest.raises(DataFormatError, match="missing required column"):
        prepare_files("t", path)


def test_items_file_supplies_titles_and_rejects_duplicates(tmp_path: Path) -> None:
    inter = "user_id,item_id,timestamp\n" + "".join(f"u1,i{n},{n}\n" for n in range(5))
    items = "item_id,title,year,genres\n" + "".join(
        f"i{n},Film {n},199{n},Drama|War\n" for n in range(5)
    )
    data = prepare_files(
        "t", write_csv(tmp_path / "i.csv", inter), write_csv(tmp_path / "items.csv", items)
    )
    assert data.catalog.row(2) | {} == {
        "item_id": "i1",
        "title": "Film 1",
        "year": 1991,
        "genres": ("Drama", "War"),
        "text": None,
        "image_path": None,
    }
    dup = write_csv(tmp_path / "dup.csv", "item_id,title\ni1,A\ni1,B\n")
    with pytest.raises(DataFormatError, match="duplicate item id") as info:
        prepare_files("t", tmp_path / "i.csv", dup)
    assert info.value.row == 2


def test_leave_one_out_holds_out_the_last_two_items() -> None:
    split = leave_one_out([np.array([1, 2, 3, 4]), np.array([5, 6, 7])])
    assert split.train[0].tolist() == [1, 2]
    assert split.valid_target.tolist() == [3, 6]
    assert split.test_target.tolist() == [4, 7]
    assert split.test_inputs()[1].tolist() == [5, 6]
    with pytest.raises(ValueError, match="fewer than 3"):
        leave_one_out([np.array([1, 2])])


def test_a_teacher_split_holds_out_the_tail_of_each_training_prefix() -> None:
    from tandem.data.split import hold_out_tail

    split = leave_one_out([np.arange(1, 9), np.arange(11, 17)])  # train 1..6 and 11..14
    teacher = hold_out_tail(split, 3)
    assert [t.tolist() for t in teacher.train] == [[1, 2, 3], [11]]
    assert teacher.valid_target.tolist() == [4, 12]
    assert teacher.test_target.tolist() == [5, 13]
    with pytest.raises(ValueError, match="at most 4 training items"):
        hold_out_tail(split, 4)
    with pytest.raises(ValueError, match="at least 2"):
        hold_out_tail(split, 1)


def test_dataset_round_trips_through_parquet(tmp_path: Path, tiny_dataset: Dataset) -> None:
    tiny_dataset.save(tmp_path / "d")
    loaded = Dataset.load(tmp_path / "d")
    assert loaded.summary == tiny_dataset.summary
    assert [s.tolist() for s in loaded.interactions.sequences()] == [
        s.tolist() for s in tiny_dataset.interactions.sequences()
    ]
    assert loaded.catalog.row(3) == tiny_dataset.catalog.row(3)


def test_interactions_with_unknown_items_are_counted_not_kept() -> None:
    catalog = Catalog.from_records(["a", "b", "c"], ["A", "B", "C"])
    raw = pd.DataFrame(
        {"user_id": ["u"] * 6, "item_id": ["a", "b", "c", "a", "zz", "b"], "timestamp": range(6)}
    )
    data = build_dataset("t", catalog, raw)
    assert data.summary.unknown_item_interactions == 1
    assert len(data.interactions) == 5


def test_cli_prepare_exits_non_zero_with_a_precise_message(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TANDEM_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    bad = write_csv(tmp_path / "bad.csv", "user_id,item_id,timestamp\nu1,i1,soon\n")
    result = CliRunner().invoke(
        app, ["data", "prepare", "--dataset", "mine", "--interactions", str(bad)]
    )
    assert result.exit_code == 2
    assert "column 'timestamp', row 1" in result.output
    assert "Traceback" not in result.output


def test_cli_prepare_saves_the_dataset(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TANDEM_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    rows = "user_id,item_id,timestamp\n" + "".join(
        f"u{u},i{n},{n}\n" for u in range(3) for n in range(6)
    )
    path = write_csv(tmp_path / "i.csv", rows)
    result = CliRunner().invoke(
        app, ["data", "prepare", "--dataset", "mine", "--interactions", str(path)]
    )
    assert result.exit_code == 0, result.output
    assert Dataset.load(tmp_path / "artifacts" / "mine" / "data").summary.users == 3
