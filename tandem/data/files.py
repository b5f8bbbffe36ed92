"""Load a user's own interactions (and optional items and users) from CSV or Parquet, strictly.

Every problem names the file, the column, the first bad row (1-based, header excluded) and what
was expected, so a CLI can print it and exit non-zero instead of training on corrupt data.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tandem.data.catalog import Catalog
from tandem.data.errors import DataFormatError
from tandem.data.users import UserProfiles

REQUIRED_INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
MAX_ID_LENGTH = 64


def read_table(path: Path) -> pd.DataFrame:
    """Read CSV or Parquet by suffix, keeping ids as strings."""
    if not path.is_file():
        raise DataFormatError(str(path), "file not found")
    suffix = path.suffix.lower()
    try:
        if suffix in {".csv", ".tsv"}:
            return pd.read_csv(
                path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False
            )
        if suffix in {".parquet", ".pq"}:
            return pd.read_parquet(path)
    except (pd.errors.ParserError, ValueError, OSError) as exc:
        raise DataFormatError(str(path), f"cannot be parsed: {exc}") from exc
    raise DataFormatError(str(path), f"unsupported suffix {suffix!r}: use .csv, .tsv or .parquet")


def _first_bad(mask: pd.Series) -> int:
    return int(mask.to_numpy().nonzero()[0][0]) + 1


def _check_ids(frame: pd.DataFrame, column: str, path: Path) -> pd.Series:
    values = frame[column].astype(str).str.strip()
    bad = frame[column].isna() | (values == "") | (values.str.len() > MAX_ID_LENGTH)
    bad |= ~values.map(str.isprintable).astype(bool)
    if bad.any():
        row = _first_bad(bad)
        raise DataFormatError(
            str(path),
            f"expected a non-empty printable id of at most {MAX_ID_LENGTH} characters, "
            f"got {frame[column].iloc[row - 1]!r}",
            column=column,
            row=row,
        )
    return values


def _check_numbers(frame: pd.DataFrame, column: str, path: Path, *, integer: bool) -> pd.Series:
    numbers = pd.to_numeric(frame[column], errors="coerce")
    bad = numbers.isna()
    if integer:
        bad |= numbers.notna() & (numbers != numbers.round())
    if bad.any():
        row = _first_bad(bad)
        kind = "an integer (e.g. Unix seconds)" if integer else "a number"
        raise DataFormatError(
            str(path),
            f"expected {kind}, got {frame[column].iloc[row - 1]!r}",
            column=column,
            row=row,
        )
    return numbers.astype("int64" if integer else "float32")


def read_interactions(path: Path) -> pd.DataFrame:
    """Validated (user_id, item_id, timestamp[, rating]) frame in file order."""
    frame = read_table(path)
    missing = [c for c in REQUIRED_INTERACTION_COLUMNS if c not in frame.columns]
    if missing:
        raise DataFormatError(
            str(path),
            f"missing required column(s) {missing}; expected user_id,item_id,timestamp[,rating],"
            f" found {list(frame.columns)}",
        )
    if frame.empty:
        raise DataFormatError(str(path), "no rows")
    out = pd.DataFrame(
        {
            "user_id": _check_ids(frame, "user_id", path),
            "item_id": _check_ids(frame, "item_id", path),
            "timestamp": _check_numbers(frame, "timestamp", path, integer=True),
        }
    )
    if "rating" in frame.columns:
        out["rating"] = _check_numbers(frame, "rating", path, integer=False)
    return out


def read_items(path: Path) -> Catalog:
    """Items with item_id and title; optional year, genres ("|"-separated), text, image_path."""
    frame = read_table(path)
    for column in ("item_id", "title"):
        if column not in frame.columns:
            raise DataFormatError(
                str(path), f"missing required column {column!r}; found {list(frame.columns)}"
            )
    ids = _check_ids(frame, "item_id", path)
    duplicated = ids.duplicated()
    if duplicated.any():
        row = _first_bad(duplicated)
        raise DataFormatError(
            str(path), f"duplicate item id {ids.iloc[row - 1]!r}", column="item_id", row=row
        )
    years = None
    if "year" in frame.columns:
        raw = frame["year"].replace("", None)
        years_num = pd.to_numeric(raw, errors="coerce")
        bad = raw.notna() & years_num.isna()
        if bad.any():
            row = _first_bad(bad)
            raise DataFormatError(
                str(path), f"expected a year, got {raw.iloc[row - 1]!r}", column="year", row=row
            )
        years = [None if pd.isna(y) else int(y) for y in years_num]

    def optional(column: str) -> list[str | None] | None:
        if column not in frame.columns:
            return None
        return [str(v) if isinstance(v, str) and v else None for v in frame[column]]

    genres = None
    if "genres" in frame.columns:
        genres = [tuple(g for g in str(v).split("|") if g) for v in frame["genres"]]
    return Catalog.from_records(
        item_ids=ids.tolist(),
        titles=frame["title"].astype(str).tolist(),
        years=years,
        genres=genres,
        texts=optional("text"),
        image_paths=optional("image_path"),
    )


def catalog_from_ids(item_ids: list[str]) -> Catalog:
    """A catalog for interactions without an items file: the id doubles as the title."""
    return Catalog.from_records(item_ids=item_ids, titles=item_ids)


USER_TEXT_COLUMNS = ("gender", "occupation", "zip_code")
MAX_AGE = 130


def read_users(path: Path) -> UserProfiles:
    """User side features: user_id, and any of age, gender, occupation, zip_code.

    Empty cells are missing values; an age must be a whole number in 0..130 and text fields
    printable and at most 64 characters. Other columns are ignored.
    """
    frame = read_table(path)
    if "user_id" not in frame.columns:
        raise DataFormatError(
            str(path),
            "missing required column 'user_id'; expected user_id[,age,gender,occupation,"
            f"zip_code], found {list(frame.columns)}",
        )
    ids = _check_ids(frame, "user_id", path)
    duplicated = ids.duplicated()
    if duplicated.any():
        row = _first_bad(duplicated)
        raise DataFormatError(
            str(path), f"duplicate user id {ids.iloc[row - 1]!r}", column="user_id", row=row
        )
    out = pd.DataFrame({"user_id": ids.to_numpy(dtype=object)})
    out["age"] = _optional_ages(frame, path)
    for column in USER_TEXT_COLUMNS:
        out[column] = _optional_texts(frame, column, path)
    return UserProfiles(out)


def _missing(values: pd.Series) -> pd.Series:
    return values.isna() | (values.astype(str).str.strip() == "")


def _optional_ages(frame: pd.DataFrame, path: Path) -> pd.arrays.IntegerArray:
    if "age" not in frame.columns:
        return pd.array([None] * len(frame), dtype="Int64")
    raw = frame["age"]
    absent = _missing(raw)
    ages = pd.to_numeric(raw.where(~absent, None), errors="coerce")
    bad = ~absent & (ages.isna() | (ages != ages.round()) | (ages < 0) | (ages > MAX_AGE))
    if bad.any():
        row = _first_bad(bad)
        raise DataFormatError(
            str(path),
            f"expected a whole age in 0..{MAX_AGE} or an empty cell, got {raw.iloc[row - 1]!r}",
            column="age",
            row=row,
        )
    return pd.array([None if pd.isna(a) else int(a) for a in ages], dtype="Int64")


def _optional_texts(frame: pd.DataFrame, column: str, path: Path) -> list[str | None]:
    if column not in frame.columns:
        return [None] * len(frame)
    raw = frame[column]
    absent = _missing(raw)
    values = raw.astype(str).str.strip()
    bad = ~absent & ((values.str.len() > MAX_ID_LENGTH) | ~values.map(str.isprintable).astype(bool))
    if bad.any():
        row = _first_bad(bad)
        raise DataFormatError(
            str(path),
            f"expected printable text of at most {MAX_ID_LENGTH} characters or an empty cell, "
            f"got {raw.iloc[row - 1]!r}",
            column=column,
            row=row,
        )
    return [None if gone else value for gone, value in zip(absent, values, strict=True)]
