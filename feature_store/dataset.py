"""Feature records from a prepared dataset plus optional enrichment outputs.

Accepted enrichment files (the enrichment stage writes these):

- item embeddings: safetensors with a float16/float32 tensor ``embeddings`` of shape
  ``[num_items + 1, d]`` in catalog index order (row 0 is padding and is not published);
- preferences: JSONL or Parquet rows ``{"user_id", "preference", "watermark"?}``;
- captions: JSONL or Parquet rows ``{"item_id", "caption"}``.

Rows for users or items the dataset does not know are skipped and counted, not fatal: the
enrichment may have run on a superset. Side features come from the dataset itself: user
profiles (age, gender, occupation, zip code) when it has a users file, item year and genres
from its catalog.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import pandas as pd

from feature_store.schema import FORMAT, ItemRecord, UserRecord
from feature_store.writer import DEFAULT_HISTORY_CAP, FeatureWriter
from tandem.artifacts import MANIFEST
from tandem.data import DataFormatError, Dataset
from tandem.data.users import UserProfile

EMBEDDINGS_TENSOR = "embeddings"
T = TypeVar("T")


class Records(Generic[T]):
    """A sized, re-iterable sequence of records built on demand (progress bars need the size)."""

    def __init__(self, size: int, build: Callable[[], Iterator[T]]):
        self._size, self._build = size, build

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[T]:
        return self._build()


@dataclass
class Preference:
    text: str
    watermark: int


@dataclass
class FeatureSources:
    """Everything a publish needs, and what was skipped on the way."""

    users: Records[UserRecord]
    items: Records[ItemRecord]
    embedding_dim: int | None
    manifest_id: str
    skipped: dict[str, int] = field(default_factory=dict)


def profile_fields(profile: UserProfile | None) -> dict[str, object]:
    """A dataset user's side features as ``UserRecord`` fields (None where unknown)."""
    return {
        "age": profile.age if profile else None,
        "gender": profile.gender if profile else None,
        "occupation": profile.occupation if profile else None,
        "zip_code": profile.zip_code if profile else None,
    }


def records_from_dataset(
    dataset: Dataset,
    *,
    history_cap: int = DEFAULT_HISTORY_CAP,
    embeddings: np.ndarray | None = None,
    preferences: dict[str, Preference] | None = None,
    captions: dict[str, str] | None = None,
) -> tuple[Records[UserRecord], Records[ItemRecord]]:
    """Users (their newest ``history_cap`` items, oldest first) and items of ``dataset``."""
    catalog = dataset.catalog
    if embeddings is not None and embeddings.shape[0] != catalog.num_items + 1:
        raise ValueError(
            f"item embeddings have {embeddings.shape[0]} rows; the catalog needs "
            f"{catalog.num_items + 1} (num_items + padding row 0)"
        )
    user_ids = dataset.interactions.user_ids
    prefs = preferences or {}
    caps = captions or {}
    item_ids = np.asarray(catalog.item_ids, dtype=object)
    built_at = time.time()  # one timestamp: iterating again yields identical records

    def users() -> Iterator[UserRecord]:
        sequences = dataset.interactions.sequences()
        for user_id, sequence in zip(user_ids, sequences, strict=True):
            pref = prefs.get(user_id)
            yield UserRecord(
                user_id=user_id,
                history=tuple(item_ids[sequence[-history_cap:] - 1]),
                preference=pref.text if pref else None,
                watermark=pref.watermark if pref else 0,
                updated_at=built_at,
                **profile_fields(dataset.profile(user_id)),
            )

    def items() -> Iterator[ItemRecord]:
        frame = catalog.frame
        columns = (frame["item_id"], frame["title"], frame["text"], frame["year"], frame["genres"])
        for index, (item_id, title, text, year, genres) in enumerate(
            zip(*columns, strict=True), start=1
        ):
            yield ItemRecord(
                item_id=item_id,
                title=str(title),
                caption=caps.get(item_id),
                text=None if text is None or pd.isna(text) else str(text),
                embedding=None if embeddings is None else embeddings[index],
                year=None if pd.isna(year) else int(year),
                genres=tuple(genres),
            )

    return Records(len(user_ids), users), Records(catalog.num_items, items)


def load_sources(
    dataset: Dataset,
    *,
    history_cap: int = DEFAULT_HISTORY_CAP,
    embeddings_path: Path | None = None,
    preferences_path: Path | None = None,
    captions_path: Path | None = None,
) -> FeatureSources:
    """Read the optional enrichment files and build the records and a content-derived id."""
    embeddings = load_item_embeddings(embeddings_path) if embeddings_path else None
    skipped: dict[str, int] = {}
    preferences = captions = None
    if preferences_path is not None:
        preferences = load_preferences(preferences_path)
        known = set(dataset.interactions.user_ids)
        skipped["preferences of unknown users"] = sum(u not in known for u in preferences)
    if captions_path is not None:
        captions = load_captions(captions_path)
        skipped["captions of unknown items"] = sum(i not in dataset.catalog for i in captions)
    users, items = records_from_dataset(
        dataset,
        history_cap=history_cap,
        embeddings=embeddings,
        preferences=preferences,
        captions=captions,
    )
    parts = [f"{dataset.name}@{dataset.summary.fingerprint}"]
    for tag, path in (("emb", embeddings_path), ("pref", preferences_path), ("cap", captions_path)):
        if path is not None:
            parts.append(f"{tag}:{_content_id(path)}")
    if len(dataset.users):
        parts.append(f"users:{_frame_id(dataset.users.to_parquet_frame())}")
    # The codec format is part of the identity: a version written by an older format (without
    # side features) must not be re-activated in place of a fresh publish.
    parts.append(f"format:{FORMAT}")
    return FeatureSources(
        users=users,
        items=items,
        embedding_dim=None if embeddings is None else int(embeddings.shape[1]),
        manifest_id="+".join(parts),
        skipped=skipped,
    )


def publish_sources(
    writer: FeatureWriter,
    dataset: Dataset,
    *,
    embeddings_path: Path | None = None,
    preferences_path: Path | None = None,
    captions_path: Path | None = None,
    embedding_dtype: str = "float16",
    batch_size: int = 1000,
    resume: bool = True,
    progress: bool = False,
    before_publish: Callable[[str], None] | None = None,
) -> tuple[int, FeatureSources]:
    """Load ``dataset``'s records (plus the enrichment files given) and publish one version.

    Users keep the writer's ``history_cap`` newest items. The manifest id comes from the inputs'
    content, so the same inputs published again re-activate their version instead of writing a
    new one. Returns the serving version and the sources (sizes, skipped rows) for reports.
    ``before_publish`` gets the manifest id before anything is written (the events watermark
    of the snapshot must be recorded before readers can see the version).
    """
    sources = load_sources(
        dataset,
        history_cap=writer.history_cap,
        embeddings_path=embeddings_path,
        preferences_path=preferences_path,
        captions_path=captions_path,
    )
    if before_publish is not None:
        before_publish(sources.manifest_id)
    version = writer.publish(
        sources.users,
        sources.items,
        manifest_id=sources.manifest_id,
        embedding_dim=sources.embedding_dim,
        embedding_dtype=embedding_dtype,
        batch_size=batch_size,
        progress=progress,
        resume=resume,
    )
    return version, sources


def load_item_embeddings(path: Path) -> np.ndarray:
    """The ``embeddings`` tensor of a safetensors file as float32 ``[num_items + 1, d]``."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"item embeddings file {path} not found")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            if EMBEDDINGS_TENSOR not in handle.keys():  # noqa: SIM118 - safe_open has no __contains__
                raise DataFormatError(
                    str(path), f"no tensor {EMBEDDINGS_TENSOR!r} (found {sorted(handle.keys())})"
                )
            array = handle.get_tensor(EMBEDDINGS_TENSOR)
    except DataFormatError:
        raise
    except Exception as exc:  # safetensors raises its own error types for bad files/dtypes
        raise DataFormatError(str(path), f"not a readable float safetensors file: {exc}") from exc
    if array.ndim != 2 or array.dtype.kind != "f":
        raise DataFormatError(
            str(path), f"{EMBEDDINGS_TENSOR!r} must be a 2-d float tensor, got {array.dtype} "
            f"{array.shape}"
        )  # fmt: skip
    return array.astype(np.float32)


def load_preferences(path: Path) -> dict[str, Preference]:
    rows = _read_rows(path, required=("user_id", "preference"))
    out = {}
    for number, row in enumerate(rows, start=1):
        watermark = row.get("watermark")
        try:
            mark = 0 if watermark is None or pd.isna(watermark) else int(watermark)
        except (TypeError, ValueError) as exc:
            raise DataFormatError(
                str(path), "not an integer", column="watermark", row=number
            ) from exc
        out[str(row["user_id"])] = Preference(str(row["preference"]), mark)
    return out


def load_captions(path: Path) -> dict[str, str]:
    rows = _read_rows(path, required=("item_id", "caption"))
    return {str(row["item_id"]): str(row["caption"]) for row in rows}


def _read_rows(path: Path, required: Sequence[str]) -> list[dict]:
    """Rows of a JSONL (``.jsonl``/``.json``) or Parquet file, with required non-null fields."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    if path.suffix == ".parquet":
        rows = pd.read_parquet(path).to_dict("records")
    elif path.suffix in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(str(path), f"not JSON: {exc.msg}", row=number) from exc
            if not isinstance(row, dict):
                raise DataFormatError(str(path), "each line must be a JSON object", row=number)
            rows.append(row)
    else:
        raise DataFormatError(str(path), "expected a .jsonl or .parquet file")
    for number, row in enumerate(rows, start=1):
        for column in required:
            value = row.get(column)
            if value is None or (isinstance(value, float) and np.isnan(value)) or value == "":
                raise DataFormatError(str(path), "missing or empty", column=column, row=number)
    return rows


def _frame_id(frame: pd.DataFrame) -> str:
    """A content hash of a small frame (the users' side features)."""
    hashed = pd.util.hash_pandas_object(frame.astype(str), index=False).to_numpy()
    return hashlib.sha256(hashed.tobytes()).hexdigest()[:12]


def _content_id(path: Path) -> str:
    """A content hash of the file, after the producing run's id if its manifest is beside it."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    content = digest.hexdigest()[:12]
    manifest = path.parent / MANIFEST
    if manifest.is_file():
        try:
            run_id = json.loads(manifest.read_text()).get("run_id")
        except (OSError, ValueError):
            run_id = None
        if run_id:
            return f"{run_id}/{content}"
    return content
