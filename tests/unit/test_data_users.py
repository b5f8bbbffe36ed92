"""User side features: the optional users file, MovieLens' .user, saving and the lookup."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from tandem.cli import app
from tandem.data import (
    DataFormatError,
    Dataset,
    UserProfile,
    UserProfiles,
    prepare_files,
    prepare_movielens_100k,
)

INTERACTIONS = "user_id,item_id,timestamp\n" + "".join(
    f"u{u},i{n},{n}\n" for u in range(3) for n in range(6)
)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_movielens_users_carry_age_gender_occupation_and_zip() -> None:
    data = prepare_movielens_100k()
    assert data.summary.profiles == 943
    assert data.profile("1") == UserProfile("1", 24, "M", "technician", "85711")
    assert data.profile("no-such-user") is None


def test_users_file_may_omit_columns_and_cells(tmp_path: Path) -> None:
    users = write(tmp_path / "users.csv", "user_id,age,occupation\nu0,31,\nu1,,nurse\nu9,40,x\n")
    data = prepare_files("t", write(tmp_path / "i.csv", INTERACTIONS), users_path=users)
    assert data.profile("u0") == UserProfile("u0", age=31)
    assert data.profile("u1") == UserProfile("u1", occupation="nurse")
    assert data.profile("u2") is None  # no row: no side features
    assert "u9" not in data.users  # not in the interactions: dropped with the user
    assert data.summary.profiles == 2


def test_a_dataset_without_users_has_no_side_features(tmp_path: Path) -> None:
    data = prepare_files("t", write(tmp_path / "i.csv", INTERACTIONS))
    assert len(data.users) == 0 and data.profile("u0") is None
    data.save(tmp_path / "d")
    assert not (tmp_path / "d" / "users.parquet").exists()
    assert Dataset.load(tmp_path / "d").profile("u0") is None


def test_side_features_round_trip_through_parquet(tmp_path: Path) -> None:
    users = write(
        tmp_path / "users.csv",
        "user_id,age,gender,occupation,zip_code\nu0,31,F,nurse,02139\nu1,,,,\n",
    )
    data = prepare_files("t", write(tmp_path / "i.csv", INTERACTIONS), users_path=users)
    data.save(tmp_path / "d")
    loaded = Dataset.load(tmp_path / "d")
    assert loaded.profile("u0") == UserProfile("u0", 31, "F", "nurse", "02139")
    assert loaded.profile("u1") == UserProfile("u1")
    assert loaded.profile("u1").is_empty
    assert loaded.summary == data.summary
    assert (
        loaded.summary.fingerprint == prepare_files("t", tmp_path / "i.csv").summary.fingerprint
    )  # side features do not change what sequential models saw


@pytest.mark.parametrize(
    ("text", "column", "row", "message"),
    [
        ("user_id,age\nu0,30\nu1,old\n", "age", 2, "whole age"),
        ("user_id,age\nu0,-1\n", "age", 1, "whole age"),
        ("user_id,age\nu0,30.5\n", "age", 1, "whole age"),
        ("user_id,gender\nu0,F\nu1,\x07\n", "gender", 2, "printable"),
        ("user_id,occupation\nu0," + "x" * 65 + "\n", "occupation", 1, "at most 64"),
        ("user_id,age\nu0,1\nu0,2\n", "user_id", 2, "duplicate user id"),
        ("user_id,age\n,1\n", "user_id", 1, "non-empty"),
    ],
)
def test_bad_users_files_name_file_column_and_row(
    tmp_path: Path, text: str, column: str, row: int, message: str
) -> None:
    users = write(tmp_path / "users.csv", text)
    with pytest.raises(DataFormatError, match=message) as info:
        prepare_files("t", write(tmp_path / "i.csv", INTERACTIONS), users_path=users)
    assert (info.value.column, info.value.row) == (column, row)
    assert str(users) in str(info.value)


def test_users_file_without_a_user_id_column_is_refused(tmp_path: Path) -> None:
    users = write(tmp_path / "users.csv", "id,age\nu0,3\n")
    with pytest.raises(DataFormatError, match="missing required column 'user_id'"):
        prepare_files("t", write(tmp_path / "i.csv", INTERACTIONS), users_path=users)


def test_profiles_reject_duplicate_ids() -> None:
    with pytest.raises(ValueError, match="duplicate user ids"):
        UserProfiles.from_profiles([UserProfile("a"), UserProfile("a")])


def test_cli_prepare_reads_a_users_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TANDEM_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    inter = write(tmp_path / "i.csv", INTERACTIONS)
    users = write(tmp_path / "u.csv", "user_id,age,gender\nu0,30,F\n")
    result = CliRunner().invoke(
        app,
        [
            "data",
            "prepare",
            "--dataset",
            "mine",
            "--interactions",
            str(inter),
            "--users",
            str(users),
        ],
    )
    assert result.exit_code == 0, result.output
    loaded = Dataset.load(tmp_path / "artifacts" / "mine" / "data")
    assert loaded.profile("u0") == UserProfile("u0", age=30, gender="F")
    bad = write(tmp_path / "bad.csv", "user_id,age\nu0,ancient\n")
    result = CliRunner().invoke(
        app,
        ["data", "prepare", "--dataset", "mine", "--interactions", str(inter), "--users", str(bad)],
    )
    assert result.exit_code == 2
    assert "column 'age', row 1" in result.output
