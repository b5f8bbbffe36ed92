"""Keys, records and value codecs of the feature store: the one place that knows the layout.

Layout of a namespace ``ns`` (every key starts with ``tandem:<ns>:``):

- ``current``           string, the serving version number (the alias; one SET flips it).
- ``history``           list, versions in the order they went live, newest first (rollback).
- ``version_counter``   string, INCR'd for each new version, so numbers are never reused and a
                        reader's cached schema can never describe different data.
- ``versions``          sorted set of every version that has keys (score = version).
- ``lock``              string with a token and a TTL: one publisher/operator at a time.
- ``v<n>:schema``       hash, the version's :class:`VersionSchema` (state, codec, counts).
- ``v<n>:user:<id>``    hash, a :class:`UserRecord` (TTL).
- ``v<n>:item:<id>``    hash, an :class:`ItemRecord`.

No hash tags: data keys spread over a cluster's slots. Every read touches independent keys
(no MULTI), so a cluster pipeline simply fans out to the owning nodes.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

# Codec format written by this code; bump on any change. Format 2 added the side features
# (user age/gender/occupation/zip_code, item year/genres) as optional fields, so a format-1
# version still decodes: its records read as having no side features.
FORMAT = 2
READABLE_FORMATS = (1, 2)
NAMESPACE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
EMBEDDING_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
USER_FIELDS = (
    "history", "preference", "watermark", "updated_at", "age", "gender", "occupation", "zip_code",
)  # fmt: skip
ITEM_FIELDS = ("title", "caption", "text", "embedding", "year", "genres")
USER_SIDE_FIELDS = ("gender", "occupation", "zip_code")  # optional text side features


class CorruptValueError(ValueError):
    """A stored value does not decode; ``key`` and ``field`` say where."""

    def __init__(self, key: str, field_name: str, problem: str):
        self.key = key
        self.field = field_name
        super().__init__(f"corrupt value at {key!r} field {field_name!r}: {problem}")


@dataclass(frozen=True)
class UserRecord:
    """What the gateway knows about a user: recent history (oldest first) and preference text.

    ``watermark`` is the history position the preference text was written from, so a consumer
    can tell how stale the text is; ``updated_at`` is a Unix time in seconds. The side features
    (age, gender, occupation, zip code) are None when the data has none (or the version is
    format 1).
    """

    user_id: str
    history: tuple[str, ...]
    preference: str | None = None
    watermark: int = 0
    updated_at: float = field(default_factory=time.time)
    age: int | None = None
    gender: str | None = None
    occupation: str | None = None
    zip_code: str | None = None


@dataclass(frozen=True)
class ItemRecord:
    """Item features for the prompt; ``embedding`` is float32 on read (None if not published).

    ``year`` and ``genres`` are side features: None and () when unknown (or format 1).
    """

    item_id: str
    title: str
    caption: str | None = None
    text: str | None = None
    embedding: np.ndarray | None = field(default=None, compare=False, repr=False)
    year: int | None = None
    genres: tuple[str, ...] = ()


@dataclass(frozen=True)
class EmbeddingCodec:
    """Little-endian float16/float32 bytes of a fixed dimension; a wrong length is corruption."""

    dim: int
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.dtype not in EMBEDDING_DTYPES:
            raise ValueError(f"embedding dtype {self.dtype!r} not in {sorted(EMBEDDING_DTYPES)}")
        if self.dim < 1:
            raise ValueError(f"embedding dim must be positive, got {self.dim}")

    @property
    def nbytes(self) -> int:
        return self.dim * EMBEDDING_DTYPES[self.dtype].itemsize

    def encode(self, vector: np.ndarray, item_id: str = "?") -> bytes:
        array = np.asarray(vector)
        if array.shape != (self.dim,):
            raise ValueError(
                f"item {item_id!r}: embedding shape {array.shape} != ({self.dim},) "
                "declared for this publish"
            )
        with np.errstate(over="ignore"):
            out = array.astype(EMBEDDING_DTYPES[self.dtype])
        if not np.isfinite(out).all():
            raise ValueError(f"item {item_id!r}: embedding not finite as {self.dtype}")
        return out.tobytes()

    def encode_many(self, vectors: Sequence[np.ndarray], item_ids: Sequence[str]) -> list[bytes]:
        """``encode`` for a batch in one numpy pass (a publish encodes millions of these)."""
        if not vectors:
            return []
        try:
            matrix = np.stack([np.asarray(v) for v in vectors])
        except ValueError:
            matrix = None  # ragged: let encode() name the offending item
        if matrix is None or matrix.shape[1:] != (self.dim,):
            return [self.encode(v, i) for v, i in zip(vectors, item_ids, strict=True)]
        with np.errstate(over="ignore"):
            out = matrix.astype(EMBEDDING_DTYPES[self.dtype])
        finite = np.isfinite(out).all(axis=1)
        if not finite.all():
            bad = item_ids[int(np.flatnonzero(~finite)[0])]
            raise ValueError(f"item {bad!r}: embedding not finite as {self.dtype}")
        return [row.tobytes() for row in out]

    def decode(self, raw: bytes, key: str) -> np.ndarray:
        if len(raw) != self.nbytes:
            expected = f"expected {self.nbytes} ({self.dim} x {self.dtype})"
            raise CorruptValueError(key, "embedding", f"{len(raw)} bytes, {expected}")
        return np.frombuffer(raw, dtype=EMBEDDING_DTYPES[self.dtype]).astype(np.float32)


@dataclass(frozen=True)
class VersionSchema:
    """The schema record of one version: what was written, how, by which run, and how far."""

    version: int
    manifest_id: str
    state: str = "writing"  # writing -> complete -> deleting
    embedding_dim: int | None = None
    embedding_dtype: str = "float16"
    history_cap: int = 200
    format: int = FORMAT
    user_fields: tuple[str, ...] = USER_FIELDS
    item_fields: tuple[str, ...] = ITEM_FIELDS
    created_at: float = field(default_factory=time.time)
    completed_at: float | None = None
    users: int = 0  # records written so far (the resume checkpoint while writing)
    items: int = 0
    last_user: str = ""  # id of the last record of the checkpoint, checked on resume
    last_item: str = ""

    @property
    def codec(self) -> EmbeddingCodec | None:
        if self.embedding_dim is None:
            return None
        return EmbeddingCodec(self.embedding_dim, self.embedding_dtype)

    def to_hash(self) -> dict[str, str]:
        return {
            "version": str(self.version),
            "manifest_id": self.manifest_id,
            "state": self.state,
            "embedding_dim": "" if self.embedding_dim is None else str(self.embedding_dim),
            "embedding_dtype": self.embedding_dtype,
            "history_cap": str(self.history_cap),
            "format": str(self.format),
            "user_fields": ",".join(self.user_fields),
            "item_fields": ",".join(self.item_fields),
            "created_at": repr(self.created_at),
            "completed_at": "" if self.completed_at is None else repr(self.completed_at),
            "users": str(self.users),
            "items": str(self.items),
            "last_user": self.last_user,
            "last_item": self.last_item,
        }

    @classmethod
    def from_hash(cls, raw: Mapping[bytes | str, bytes | str], key: str) -> VersionSchema:
        values = {_text(k, key, "?"): _text(v, key, _text(k, key, "?")) for k, v in raw.items()}
        try:
            fmt = int(values.get("format", "0"))
            if fmt not in READABLE_FORMATS:
                readable = ", ".join(map(str, READABLE_FORMATS))
                raise CorruptValueError(key, "format", f"format {fmt}, this code reads {readable}")
            dim = values.get("embedding_dim", "")
            completed = values.get("completed_at", "")
            schema = cls(
                version=int(values["version"]),
                manifest_id=values["manifest_id"],
                state=values["state"],
                embedding_dim=int(dim) if dim else None,
                embedding_dtype=values.get("embedding_dtype", "float16"),
                history_cap=int(values.get("history_cap", "200")),
                format=fmt,
                user_fields=tuple(values.get("user_fields", "").split(",")),
                item_fields=tuple(values.get("item_fields", "").split(",")),
                created_at=float(values.get("created_at", "0")),
                completed_at=float(completed) if completed else None,
                users=int(values.get("users", "0")),
                items=int(values.get("items", "0")),
                last_user=values.get("last_user", ""),
                last_item=values.get("last_item", ""),
            )
            schema.codec  # noqa: B018 - validates dim and dtype
        except CorruptValueError:
            raise
        except (KeyError, ValueError) as exc:
            raise CorruptValueError(key, "schema", f"{type(exc).__name__}: {exc}") from exc
        return schema


@dataclass(frozen=True)
class Keys:
    """Key names of one namespace (validated: it is also a SCAN pattern prefix)."""

    namespace: str

    def __post_init__(self) -> None:
        if not NAMESPACE_PATTERN.match(self.namespace):
            raise ValueError(
                f"namespace {self.namespace!r} must be 1-64 characters of letters, digits, "
                "'_', '-', '.', starting with a letter or digit"
            )

    @property
    def prefix(self) -> str:
        return f"tandem:{self.namespace}:"

    @property
    def alias(self) -> str:
        return f"{self.prefix}current"

    @property
    def history(self) -> str:
        return f"{self.prefix}history"

    @property
    def counter(self) -> str:
        return f"{self.prefix}version_counter"

    @property
    def versions(self) -> str:
        return f"{self.prefix}versions"

    @property
    def lock(self) -> str:
        return f"{self.prefix}lock"

    @property
    def variants(self) -> str:
        """The ranker variants' traffic split (feature_store.splits)."""
        return f"{self.prefix}variants"

    def schema(self, version: int) -> str:
        return f"{self.prefix}v{version}:schema"

    def user(self, version: int, user_id: str) -> str:
        return f"{self.prefix}v{version}:user:{user_id}"

    def item(self, version: int, item_id: str) -> str:
        return f"{self.prefix}v{version}:item:{item_id}"

    def version_pattern(self, version: int) -> str:
        """SCAN pattern of every key of ``version`` (the namespace has no glob characters)."""
        return f"{self.prefix}v{version}:*"


def encode_history(history: Sequence[str]) -> str:
    return json.dumps(list(history), ensure_ascii=False, separators=(",", ":"))


def encode_user(user: UserRecord, history_cap: int) -> dict[str, str]:
    """Hash fields of ``user``; the history keeps its newest ``history_cap`` items."""
    if not user.user_id:
        raise ValueError("user id must be a non-empty string")
    history = list(user.history)[-history_cap:] if history_cap > 0 else []
    fields = {
        "history": encode_history(history),
        "watermark": str(int(user.watermark)),
        "updated_at": repr(float(user.updated_at)),
    }
    if user.preference is not None:
        fields["preference"] = user.preference
    if user.age is not None:
        fields["age"] = str(int(user.age))
    for name in USER_SIDE_FIELDS:
        value = getattr(user, name)
        if value is not None:
            fields[name] = value
    return fields


def decode_user(user_id: str, raw: Mapping[bytes, bytes], key: str) -> UserRecord:
    """A UserRecord from HGETALL output; raises CorruptValueError naming the bad field."""
    history_raw = raw.get(b"history")
    if history_raw is None:
        raise CorruptValueError(key, "history", "missing")
    try:
        history = json.loads(history_raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptValueError(key, "history", f"not JSON: {exc}") from exc
    # Lua's cjson writes an empty array as {}: accept it as the empty history.
    if history == {}:
        history = []
    if not isinstance(history, list) or not all(isinstance(i, str) for i in history):
        raise CorruptValueError(key, "history", "not a JSON list of strings")
    preference = raw.get(b"preference")
    age = raw.get(b"age")
    side = {name: raw.get(name.encode()) for name in USER_SIDE_FIELDS}
    return UserRecord(
        user_id=user_id,
        history=tuple(history),
        preference=None if preference is None else _text(preference, key, "preference"),
        watermark=_int(raw.get(b"watermark", b"0"), key, "watermark"),
        updated_at=_float(raw.get(b"updated_at", b"0"), key, "updated_at"),
        age=None if age is None else _int(age, key, "age"),
        **{name: None if v is None else _text(v, key, name) for name, v in side.items()},
    )


def encode_item(
    item: ItemRecord, codec: EmbeddingCodec | None, embedding: bytes | None = None
) -> dict[str, str | bytes]:
    """Hash fields of ``item``; ``embedding`` may carry its bytes already encoded in a batch."""
    if not item.item_id:
        raise ValueError("item id must be a non-empty string")
    fields: dict[str, str | bytes] = {"title": item.title}
    if item.caption is not None:
        fields["caption"] = item.caption
    if item.text is not None:
        fields["text"] = item.text
    if item.year is not None:
        fields["year"] = str(int(item.year))
    if item.genres:
        fields["genres"] = encode_history(item.genres)  # a JSON list of strings, like history
    if item.embedding is not None:
        if codec is None:
            raise ValueError(
                f"item {item.item_id!r} has an embedding but the publish declared no embedding_dim"
            )
        fields["embedding"] = (
            embedding if embedding is not None else codec.encode(item.embedding, item.item_id)
        )
    return fields


def decode_item(
    item_id: str, raw: Mapping[bytes, bytes], key: str, codec: EmbeddingCodec | None
) -> ItemRecord:
    """An ItemRecord from HGETALL output; raises CorruptValueError naming the bad field."""
    title = raw.get(b"title")
    if title is None:
        raise CorruptValueError(key, "title", "missing")
    caption, text, embedding = raw.get(b"caption"), raw.get(b"text"), raw.get(b"embedding")
    if embedding is not None and codec is None:
        raise CorruptValueError(key, "embedding", "present but the version declares none")
    year, genres = raw.get(b"year"), raw.get(b"genres")
    return ItemRecord(
        item_id=item_id,
        title=_text(title, key, "title"),
        caption=None if caption is None else _text(caption, key, "caption"),
        text=None if text is None else _text(text, key, "text"),
        embedding=None if embedding is None else codec.decode(embedding, key),
        year=None if year is None else _int(year, key, "year"),
        genres=() if genres is None else _strings(genres, key, "genres"),
    )


def _text(raw: bytes | str, key: str, field_name: str) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptValueError(key, field_name, f"not UTF-8: {exc}") from exc


def _strings(raw: bytes, key: str, field_name: str) -> tuple[str, ...]:
    try:
        values = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptValueError(key, field_name, f"not JSON: {exc}") from exc
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise CorruptValueError(key, field_name, "not a JSON list of strings")
    return tuple(values)


def _int(raw: bytes, key: str, field_name: str) -> int:
    try:
        return int(raw)
    except ValueError as exc:
        raise CorruptValueError(key, field_name, f"not an integer: {raw[:32]!r}") from exc


def _float(raw: bytes, key: str, field_name: str) -> float:
    try:
        value = float(raw)
    except ValueError as exc:
        raise CorruptValueError(key, field_name, f"not a number: {raw[:32]!r}") from exc
    if not math.isfinite(value):
        raise CorruptValueError(key, field_name, f"not finite: {raw[:32]!r}")
    return value
