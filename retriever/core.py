"""``Retriever``: a user's history (external ids) -> top-k candidate items. Serving uses this.

Loading does the heavy work once (catalog, id arrays, encoder session, Faiss index, popularity);
a request then does one id lookup, one encoder call and one index search, with no pandas and no
locks: the onnxruntime session, torch inference and Faiss search are all safe to share between
threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from retriever.artifacts import (
    INDEX_FILE,
    ONNX_FILE,
    load_item_embeddings,
    load_model,
    load_popularity,
    load_run_dataset,
    read_manifest,
)
from retriever.cold_slots import ColdSlots, fill_cold_slots, table_with_cold_rows
from retriever.index import IndexConfig, ItemIndex
from retriever.models import SequenceEncoder
from retriever.onnx import OnnxUserEncoder
from retriever.windows import left_pad
from tandem.artifacts import Manifest, resolve_run
from tandem.data import Catalog, UnknownItemsError

Engine = Literal["onnx", "torch"]


class UserEncoder(Protocol):
    def encode(self, items: np.ndarray) -> np.ndarray: ...


class TorchUserEncoder:
    """Eager torch fallback with the same interface as ``OnnxUserEncoder``."""

    def __init__(self, model: SequenceEncoder):
        self.model = model.eval()

    def encode(self, items: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model.encode(torch.from_numpy(items)).float().numpy()


class Retriever:
    """History -> candidates by inner product of the user vector with every item vector."""

    def __init__(
        self,
        *,
        catalog: Catalog,
        manifest: Manifest,
        encoder: UserEncoder,
        index: ItemIndex,
        popularity: np.ndarray,
        max_len: int,
        cold: ColdSlots | None = None,
    ):
        self.catalog = catalog
        self.manifest = manifest
        self.encoder = encoder
        self.index = index
        self.max_len = max_len
        self.cold = cold  # exploration slots for cold items (retriever.cold_slots); None = off
        self.popularity = popularity
        self.dim = int(index.item_vectors.shape[1])
        self._ids = np.array(["", *catalog.item_ids], dtype=object)  # internal index -> id
        self._lookup = {item_id: i + 1 for i, item_id in enumerate(catalog.item_ids)}
        counts = popularity.astype(np.float64)
        counts[0] = 0.0
        peak = counts.max() if counts.max() > 0 else 1.0
        self._popular_order = np.argsort(-counts[1:], kind="stable") + 1
        self._popular_score = (counts / peak).astype(np.float32)

    @classmethod
    def load(cls, run_dir: Path, *, engine: Engine = "onnx") -> Retriever:
        """Load a run folder (or a kind folder, following ``latest``); verify file hashes."""
        run_dir = resolve_run(Path(run_dir))
        manifest = read_manifest(run_dir)
        manifest.check_files(run_dir)
        dataset = load_run_dataset(run_dir, manifest)
        items = load_item_embeddings(run_dir)
        if len(items) != dataset.catalog.num_items + 1:
            raise ValueError(
                f"{len(items) - 1} item vectors for a catalog of {dataset.catalog.num_items}"
            )
        if engine == "onnx":
            encoder: UserEncoder = OnnxUserEncoder(run_dir / ONNX_FILE)
        elif engine == "torch":
            encoder = TorchUserEncoder(load_model(run_dir, manifest))
        else:
            raise ValueError(f"unknown engine {engine!r}: use 'onnx' or 'torch'")
        index_config = IndexConfig(**manifest.config.get("index", {}))
        return cls(
            catalog=dataset.catalog,
            manifest=manifest,
            encoder=encoder,
            index=ItemIndex.load(run_dir / INDEX_FILE, items, index_config),
            popularity=load_popularity(run_dir),
            max_len=int(manifest.config["model_config"]["max_len"]),
        )

    def with_cold_slots(self, cold: ColdSlots) -> Retriever:
        """This retriever with ``cold``'s vectors in its item table (a rebuilt index) and its
        slots reserved at the tail of every top-k."""
        table = table_with_cold_rows(self.index.item_vectors, cold)
        return Retriever(
            catalog=self.catalog,
            manifest=self.manifest,
            encoder=self.encoder,
            index=ItemIndex.build(table, self.index.config),
            popularity=self.popularity,
            max_len=self.max_len,
            cold=cold,
        )

    def _indices(self, item_ids: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        indices, unknown = [], []
        for item_id in item_ids:
            index = self._lookup.get(item_id)
            if index is None:
                unknown.append(item_id)
            else:
                indices.append(index)
        return np.asarray(indices, dtype=np.int64), unknown

    def retrieve(
        self, history: Sequence[str], k: int = 20, exclude: Sequence[str] = ()
    ) -> list[tuple[str, float]]:
        """Top-``k`` (item id, score) for an oldest-first history; history and ``exclude``
        items are never returned. Raises UnknownItemsError (listing them) for unknown ids and
        ValueError for an empty history (use ``popular`` for cold users)."""
        return self.retrieve_with_user_vector(history, k, exclude)[0]

    def retrieve_with_user_vector(
        self, history: Sequence[str], k: int = 20, exclude: Sequence[str] = ()
    ) -> tuple[list[tuple[str, float]], np.ndarray]:
        """``retrieve`` plus the user's sequence embedding ``[dim]`` (the ranker's user token)."""
        if isinstance(history, str) or isinstance(exclude, str):
            raise TypeError("history and exclude must be sequences of item ids, not a string")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if len(history) == 0:
            raise ValueError("empty history: a retriever needs at least one item (use popular())")
        seen, unknown = self._indices(history)
        barred, unknown_excluded = self._indices(exclude)
        if unknown or unknown_excluded:
            raise UnknownItemsError(list(dict.fromkeys(unknown + unknown_excluded)))
        vector = self.encoder.encode(seen[-self.max_len :][None])[0]
        hidden = np.concatenate([seen, barred])
        reserved = min(self.cold.slots, k) if self.cold is not None else 0
        if reserved < k:
            items, scores = self.index.search(vector[None], k - reserved, [hidden])
            found = items[0] > 0
            top, top_scores = items[0][found], scores[0][found]
        else:
            top, top_scores = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        if reserved:
            top, top_scores = fill_cold_slots(top, top_scores, vector, self.cold, k, hidden)
        ranked = zip(self._ids[top], top_scores.tolist(), strict=True)
        return [(str(i), float(s)) for i, s in ranked], vector

    def user_vectors(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        """User vectors ``[B, dim]`` for histories of internal indices (offline use)."""
        arrays = [np.asarray(h, dtype=np.int64) for h in histories]
        if any(len(a) == 0 for a in arrays):
            raise ValueError("every history needs at least one item")
        if not arrays:
            return np.zeros((0, self.dim), dtype=np.float32)
        longest = min(max(len(a) for a in arrays), self.max_len)
        return self.encoder.encode(left_pad(arrays, longest))

    def item_embeddings(self) -> np.ndarray:
        """The item table ``[num_items + 1, dim]`` float32; row 0 is padding."""
        return self.index.item_vectors

    def popular(self, k: int, exclude: Sequence[str] = ()) -> list[tuple[str, float]]:
        """Most-interacted items (score = count / top count), for users with no history."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        barred, unknown = self._indices(exclude)
        if unknown:
            raise UnknownItemsError(unknown)
        order = self._popular_order
        if len(barred):
            order = order[~np.isin(order, barred)]
        top = order[:k]
        return [(str(self._ids[i]), float(self._popular_score[i])) for i in top]
