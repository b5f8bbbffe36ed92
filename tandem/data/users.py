"""User side features (age, gender, occupation, zip code): a frame plus a per-user lookup.

Side features are optional at every level: a dataset may have no users file, a users file may
lack any of the optional columns, and a row may leave any field empty. Missing is ``None``,
never a made-up default, so a prompt can leave the field out instead of inventing one.
The ranker reads them through :meth:`UserProfiles.get`; the feature store publishes them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import pandas as pd

USER_COLUMNS = ("user_id", "age", "gender", "occupation", "zip_code")


@dataclass(frozen=True)
class UserProfile:
    """One user's side features; every field may be missing (None)."""

    user_id: str
    age: int | None = None
    gender: str | None = None
    occupation: str | None = None
    zip_code: str | None = None

    @property
    def is_empty(self) -> bool:
        """True when nothing but the id is known (nothing worth publishing or prompting)."""
        return all(v is None for v in (self.age, self.gender, self.occupation, self.zip_code))


@dataclass(frozen=True)
class UserProfiles:
    """Side features of many users as a frame with columns ``USER_COLUMNS``.

    ``user_id`` is a string and unique; ``age`` a nullable Int64; the rest strings or None.
    """

    frame: pd.DataFrame
    _rows: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        missing = [c for c in USER_COLUMNS if c not in self.frame.columns]
        if missing:
            raise ValueError(f"user profile frame lacks columns {missing}")
        ids = self.frame["user_id"].tolist()
        rows = {user_id: n for n, user_id in enumerate(ids)}
        if len(rows) != len(ids):
            dup = self.frame["user_id"][self.frame["user_id"].duplicated()].tolist()[:5]
            raise ValueError(f"duplicate user ids in user profiles: {dup}")
        object.__setattr__(self, "_rows", rows)

    @classmethod
    def empty(cls) -> UserProfiles:
        return cls.from_profiles([])

    @classmethod
    def from_profiles(cls, profiles: Iterable[UserProfile]) -> UserProfiles:
        rows = list(profiles)
        frame = pd.DataFrame(
            {
                "user_id": pd.Series([p.user_id for p in rows], dtype=object),
                "age": pd.array([p.age for p in rows], dtype="Int64"),
                "gender": pd.Series([p.gender for p in rows], dtype=object),
                "occupation": pd.Series([p.occupation for p in rows], dtype=object),
                "zip_code": pd.Series([p.zip_code for p in rows], dtype=object),
            }
        )
        return cls(frame)

    def __len__(self) -> int:
        return len(self.frame)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._rows

    def get(self, user_id: str) -> UserProfile | None:
        """The side features of ``user_id``, or None when the data has none for this user."""
        row = self._rows.get(user_id)
        if row is None:
            return None
        record = self.frame.iloc[row]
        return UserProfile(
            user_id=user_id,
            age=None if pd.isna(record["age"]) else int(record["age"]),
            gender=_text(record["gender"]),
            occupation=_text(record["occupation"]),
            zip_code=_text(record["zip_code"]),
        )

    def restricted_to(self, user_ids: Iterable[str]) -> UserProfiles:
        """Only the rows of ``user_ids`` (users the dataset kept), in the frame's order."""
        keep = self.frame["user_id"].isin(set(user_ids))
        return UserProfiles(self.frame[keep].reset_index(drop=True))

    def to_parquet_frame(self) -> pd.DataFrame:
        return self.frame[list(USER_COLUMNS)]

    @classmethod
    def from_parquet_frame(cls, frame: pd.DataFrame) -> UserProfiles:
        frame = frame.copy()
        frame["user_id"] = frame["user_id"].astype(str)
        frame["age"] = frame["age"].astype("Int64")
        for column in ("gender", "occupation", "zip_code"):
            frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
        return cls(frame)


def _text(value: object) -> str | None:
    return None if value is None or pd.isna(value) else str(value)
