"""A prepared dataset: catalog + interactions (+ user side features), saved as Parquet.

The fingerprint covers items and interactions only: it names what a sequential model saw, and
adding a users file later must not invalidate the models trained on the same interactions.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from tandem.data.catalog import Catalog
from tandem.data.errors import DataFormatError
from tandem.data.files import catalog_from_ids, read_interactions, read_items, read_users
from tandem.data.interactions import Interactions
from tandem.data.movielens import load_movielens_100k, load_movielens_users
from tandem.data.split import MIN_SEQUENCE_LENGTH, LeaveOneOutSplit, leave_one_out
from tandem.data.users import UserProfile, UserProfiles

DEFAULT_MIN_INTERACTIONS = 5


@dataclass(frozen=True)
class DataSummary:
    """What preparation kept and dropped; printed by the CLI and stored beside the data."""

    name: str
    users: int
    items: int
    interactions: int
    dropped_users: int
    dropped_interactions: int
    unknown_item_interactions: int
    fingerprint: str
    profiles: int = 0  # kept users with side features (0 = no users file)


@dataclass(frozen=True)
class Dataset:
    name: str
    catalog: Catalog
    interactions: Interactions
    summary: DataSummary
    users: UserProfiles = field(default_factory=UserProfiles.empty)  # side features, optional

    def split(self) -> LeaveOneOutSplit:
        return leave_one_out(self.interactions.sequences())

    def profile(self, user_id: str) -> UserProfile | None:
        """The user's side features (age, gender, occupation, zip), or None when unknown."""
        return self.users.get(user_id)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        catalog = self.catalog.frame.assign(genres=self.catalog.frame["genres"].map(list))
        catalog.to_parquet(folder / "items.parquet", index=False)
        self.interactions.frame[["user_id", "item_id", "timestamp", "rating"]].to_parquet(
            folder / "interactions.parquet", index=False
        )
        users_path = folder / "users.parquet"
        if len(self.users):
            self.users.to_parquet_frame().to_parquet(users_path, index=False)
        else:
            users_path.unlink(missing_ok=True)
        (folder / "summary.json").write_text(json.dumps(asdict(self.summary), indent=2))

    @classmethod
    def load(cls, folder: Path) -> Dataset:
        if not (folder / "summary.json").is_file():
            raise FileNotFoundError(
                f"no prepared dataset in {folder}: run `tandem data prepare` first"
            )
        summary = DataSummary(**json.loads((folder / "summary.json").read_text()))
        items = pd.read_parquet(folder / "items.parquet")
        items["genres"] = items["genres"].map(tuple)
        items["year"] = items["year"].astype("Int64")
        catalog = Catalog(items)
        interactions = Interactions.build(pd.read_parquet(folder / "interactions.parquet"), catalog)
        users_path = folder / "users.parquet"
        users = (
            UserProfiles.from_parquet_frame(pd.read_parquet(users_path))
            if users_path.is_file()
            else UserProfiles.empty()
        )
        return cls(summary.name, catalog, interactions, summary, users)


def build_dataset(
    name: str,
    catalog: Catalog,
    raw: pd.DataFrame,
    *,
    min_interactions: int = DEFAULT_MIN_INTERACTIONS,
    source: str = "<memory>",
    users: UserProfiles | None = None,
) -> Dataset:
    """Drop interactions with unknown items and users below ``min_interactions``, then index.

    ``users`` (side features) keeps only the users that remain; users without a row simply
    have no side features.
    """
    if min_interactions < MIN_SEQUENCE_LENGTH:
        raise ValueError(
            f"min_interactions must be at least {MIN_SEQUENCE_LENGTH} "
            "(leave-one-out needs a training, a validation and a test item)"
        )
    known = raw["item_id"].astype(str).isin(set(catalog.item_ids))
    unknown_count = int((~known).sum())
    raw = raw[known]
    counts = raw.groupby("user_id")["item_id"].transform("size")
    keep = counts >= min_interactions
    dropped_users = int(raw.loc[~keep, "user_id"].nunique())
    kept = raw[keep]
    if kept.empty:
        raise DataFormatError(
            source, f"no user has at least {min_interactions} interactions with known items"
        )
    interactions = Interactions.build(kept, catalog)
    profiles = (users or UserProfiles.empty()).restricted_to(interactions.user_ids)
    summary = DataSummary(
        name=name,
        users=interactions.num_users,
        items=catalog.num_items,
        interactions=len(interactions),
        dropped_users=dropped_users,
        dropped_interactions=int((~keep).sum()),
        unknown_item_interactions=unknown_count,
        fingerprint=fingerprint(catalog, interactions),
        profiles=len(profiles),
    )
    return Dataset(name, catalog, interactions, summary, profiles)


def fingerprint(catalog: Catalog, interactions: Interactions) -> str:
    """A content hash of items and ordered interactions: manifests record what a model saw."""
    digest = hashlib.sha256()
    digest.update("\x1f".join(catalog.item_ids).encode())
    frame = interactions.frame
    for column in ("user_id", "item_id"):
        digest.update("\x1f".join(frame[column].tolist()).encode())
    digest.update(frame["timestamp"].to_numpy().tobytes())
    return digest.hexdigest()[:16]


def prepare_movielens_100k(min_interactions: int = DEFAULT_MIN_INTERACTIONS) -> Dataset:
    catalog, raw = load_movielens_100k()
    return build_dataset(
        "ml-100k", catalog, raw, min_interactions=min_interactions, users=load_movielens_users()
    )


def prepare_files(
    name: str,
    interactions_path: Path,
    items_path: Path | None = None,
    min_interactions: int = DEFAULT_MIN_INTERACTIONS,
    users_path: Path | None = None,
) -> Dataset:
    raw = read_interactions(interactions_path)
    users = read_users(users_path) if users_path is not None else None
    if items_path is not None:
        catalog = read_items(items_path)
    else:
        catalog = catalog_from_ids(list(dict.fromkeys(raw["item_id"].tolist())))
    return build_dataset(
        name,
        catalog,
        raw,
        min_interactions=min_interactions,
        source=str(interactions_path),
        users=users,
    )
