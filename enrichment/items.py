"""Multimodal item embeddings aligned to the retriever's ID space (CIT-Rec's item module).

Three towers per item: text (MiniLM over "title : caption", genres, year), image (a CLIP-style
vision model, only when the catalog has image paths and a checkpoint is given) and ID (the
retriever's item embedding). The fusion encoder maps the content towers into the ID space
(InfoNCE, ``enrichment.fusion``). Outputs, per catalog index (row 0 = padding):

- ``embeddings``: the fused content vector in the ID space, at a calibrated scale (below);
- ``retrieval_embeddings``: the retriever's ID vector for warm items, the content vector for
  cold ones (no training interactions), so the Faiss index can return new items;
- ``modality_mask``: which of ``MODALITIES`` each item really had (1) or lacked (0).

Scale matters because the retriever scores by inner product: a cold item's content vector
competes with trained ID vectors. Given user vectors (``probe_users``: the retriever's vectors
of validation histories), the scale is the least-squares slope of ``user . id`` on
``user . content`` over warm items held out of fusion training, so a content score estimates
the ID score it stands in for; without them, the median norm of the warm ID vectors.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.numpy import load_file, save_file

from enrichment.calibration import ColdStartCalibration, ProbeUsers, fit_calibration
from enrichment.fusion import FusionConfig, FusionEncoder, FusionReport, encode, train_fusion
from enrichment.towers import item_text
from tandem.data import Catalog

KIND = "enrichment-items"
MODALITIES = ("text", "image", "id")
EMBEDDINGS_FILE = "item_embeddings.safetensors"
FUSION_FILE = "fusion.safetensors"

TextEncodeFn = Callable[[Sequence[str]], np.ndarray]
ImageEncodeFn = Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class ItemEnrichmentConfig:
    text_batch_size: int = 64  # texts per MiniLM forward
    image_batch_size: int = 16  # images per vision-model forward
    chunk_size: int = 256  # items per progress step (local engine)
    min_interactions: int = 1  # items with fewer training interactions are cold
    fusion: FusionConfig = field(default_factory=FusionConfig)


@dataclass
class ContentFeatures:
    """Frozen tower outputs per catalog index (row 0 zeros) and which rows really have them."""

    features: dict[str, np.ndarray]
    mask: np.ndarray  # bool [num_items + 1, len(features)], columns in ``features`` order
    image_paths: int = 0  # catalog rows with an image path
    image_errors: int = 0  # image paths that could not be read (masked, not imputed)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.features)


def item_texts(catalog: Catalog, captions: Mapping[str, str]) -> tuple[list[str], np.ndarray]:
    """Text-tower input per item (catalog order) and whether the item has any text at all."""
    frame = catalog.frame
    texts, has_text = [], []
    for item_id, title, year, genres, text in zip(
        frame["item_id"], frame["title"], frame["year"], frame["genres"], frame["text"], strict=True
    ):
        title = title if isinstance(title, str) else ""
        caption = captions.get(item_id) or (text if isinstance(text, str) and text else None)
        year = None if pd.isna(year) else int(year)
        has_text.append(bool(title.strip() or caption))
        texts.append(item_text(title, caption, tuple(genres), year))
    return texts, np.array(has_text, dtype=bool)


def _chunks(n: int, size: int | None) -> list[slice]:
    size = size or max(n, 1)
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def encode_content(
    catalog: Catalog,
    captions: Mapping[str, str],
    encode_texts: TextEncodeFn,
    encode_images: ImageEncodeFn | None = None,
    chunk_size: int | None = 256,
    on_progress: Callable[[int], None] | None = None,
) -> ContentFeatures:
    """Run the towers over the catalog; a modality an item lacks stays zero and masked.

    ``chunk_size=None`` hands the whole catalog to each encoder at once (the Ray engine
    splits the work itself).
    """
    n = catalog.num_items
    texts, has_text = item_texts(catalog, captions)
    text_parts = []
    for part in _chunks(n, chunk_size):
        text_parts.append(encode_texts(texts[part]))
        if on_progress is not None:
            on_progress(part.stop - part.start)
    text = np.concatenate(text_parts).astype(np.float32)
    text[~has_text] = 0.0
    features = {"text": _with_padding(text)}
    masks = [np.concatenate([[False], has_text])]

    paths = catalog.frame["image_path"].tolist()
    with_path = np.array([isinstance(p, str) and bool(p) for p in paths], dtype=bool)
    image_errors = 0
    if encode_images is not None and with_path.any():
        rows = np.flatnonzero(with_path)
        image, ok = encode_images([paths[r] for r in rows])
        image_errors = int((~ok).sum())
        if ok.any():  # no readable image at all: the modality is absent, not a zero tower
            full = np.zeros((n, image.shape[1]), dtype=np.float32)
            has_image = np.zeros(n, dtype=bool)
            full[rows[ok]] = image[ok]
            has_image[rows[ok]] = True
            features["image"] = _with_padding(full)
            masks.append(np.concatenate([[False], has_image]))
    return ContentFeatures(
        features=features,
        mask=np.stack(masks, axis=1),
        image_paths=int(with_path.sum()),
        image_errors=image_errors,
    )


def _with_padding(matrix: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros((1, matrix.shape[1]), dtype=np.float32), matrix])


def augmented_item_matrix(
    id_embeddings: np.ndarray,
    content_embeddings: np.ndarray,
    item_counts: np.ndarray,
    min_interactions: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Item vectors for the retriever's index: ID vectors, with cold items' content vectors.

    Cold = fewer than ``min_interactions`` training interactions: its ID vector never learned
    anything, so its content vector (already in the ID space) stands in. Cold items without
    any content keep their ID row. Returns (matrix [num_items + 1, d], cold mask).
    """
    if id_embeddings.shape != content_embeddings.shape:
        raise ValueError(
            f"ID embeddings {id_embeddings.shape} and content embeddings "
            f"{content_embeddings.shape} must have the same shape"
        )
    cold = np.asarray(item_counts) < min_interactions
    cold[0] = False
    has_content = np.abs(content_embeddings).sum(axis=1) > 0
    matrix = np.array(id_embeddings, dtype=np.float32, copy=True)
    replace = cold & has_content
    matrix[replace] = content_embeddings[replace]
    matrix[0] = 0.0
    return matrix, cold


@dataclass
class ItemEmbeddings:
    """The job's output; saved as one safetensors file (names in the module docstring)."""

    embeddings: np.ndarray
    retrieval_embeddings: np.ndarray
    modality_mask: np.ndarray
    modalities: tuple[str, ...] = MODALITIES

    @property
    def cold(self) -> np.ndarray:
        cold = self.modality_mask[:, self.modalities.index("id")] == 0
        cold[0] = False
        return cold

    def save(self, path: Path) -> None:
        save_file(
            {
                "embeddings": np.ascontiguousarray(self.embeddings, dtype=np.float32),
                "retrieval_embeddings": np.ascontiguousarray(
                    self.retrieval_embeddings, dtype=np.float32
                ),
                "modality_mask": np.ascontiguousarray(self.modality_mask, dtype=np.uint8),
            },
            str(path),
            metadata={"modalities": json.dumps(list(self.modalities))},
        )

    @classmethod
    def load(cls, path: Path) -> ItemEmbeddings:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as handle:
            modalities = tuple(json.loads((handle.metadata() or {}).get("modalities", "[]")))
        tensors = load_file(str(path))
        return cls(
            tensors["embeddings"],
            tensors["retrieval_embeddings"],
            tensors["modality_mask"],
            modalities or MODALITIES,
        )


@dataclass
class ItemEnrichmentResult:
    items: ItemEmbeddings
    encoder: FusionEncoder
    report: FusionReport
    id_scale: float
    scale_method: str = "median-norm"  # or "calibrated" (least squares on probe users)
    calibration: ColdStartCalibration | None = None  # cold rows of the index, when fitted

    def summary(self) -> dict[str, float | int]:
        mask = self.items.modality_mask[1:]
        counts = {f"items_with_{m}": int(mask[:, i].sum()) for i, m in enumerate(MODALITIES)}
        cold = self.items.cold[1:]
        return {
            "items": len(mask),
            **counts,
            "cold_items": int(cold.sum()),
            "cold_items_with_content": int((cold & (mask[:, :2].sum(axis=1) > 0)).sum()),
            "fusion_epochs": self.report.epochs,
            "fusion_initial_valid_loss": round(self.report.initial_valid_loss, 4),
            "fusion_best_valid_loss": round(self.report.best_valid_loss, 4),
            "alignment_recall@10": round(self.report.valid_recall_at_10, 4),
            "alignment_chance@10": round(self.report.chance_recall_at_10, 4),
            "content_scale": round(self.id_scale, 4),
            "content_scale_method": self.scale_method,
            **(self.calibration.summary() if self.calibration is not None else {}),
        }


def enrich_items(
    content: ContentFeatures,
    id_embeddings: np.ndarray,
    item_counts: np.ndarray,
    config: ItemEnrichmentConfig = ItemEnrichmentConfig(),
    on_epoch: Callable[[int, float], None] | None = None,
    probe_users: np.ndarray | None = None,
    probes: ProbeUsers | None = None,
) -> ItemEnrichmentResult:
    """Train the fusion encoder on warm items and build the three output matrices.

    ``probe_users`` (user vectors ``[n, d]``) calibrate the content vectors' scale. ``probes``
    (the same users with their validation targets and histories) fit the cold-start
    calibration (``enrichment.calibration``): cold rows of ``retrieval_embeddings`` are then
    the calibrated map of the content features instead of the scaled content vector.
    """
    id_embeddings = np.asarray(id_embeddings, dtype=np.float32)
    rows = content.mask.shape[0]
    if id_embeddings.shape[0] != rows or len(item_counts) != rows:
        raise ValueError(
            f"the retriever has {id_embeddings.shape[0] - 1} items and the counts "
            f"{len(item_counts) - 1}, but the catalog has {rows - 1}: was the retriever "
            "trained on this dataset?"
        )
    warm = np.asarray(item_counts) >= config.min_interactions
    warm[0] = False
    has_content = content.mask.any(axis=1)
    train_rows = np.flatnonzero(warm & has_content)
    encoder, report = train_fusion(
        content.features,
        content.mask,
        id_embeddings,
        train_rows,
        config.fusion,
        on_epoch=on_epoch,
    )
    unit = encode(encoder, content.features, content.mask)
    scale = float(np.median(np.linalg.norm(id_embeddings[train_rows], axis=1)))
    method = "median-norm"
    if probe_users is not None and len(probe_users):
        calibrated = calibrated_scale(probe_users, id_embeddings, unit, report.valid_rows)
        if calibrated is not None:
            scale, method = calibrated, "calibrated"
    embeddings = unit * scale
    embeddings[0] = 0.0
    calibration = None
    stand_ins = embeddings
    if probes is not None and len(probes.vectors):
        features = calibration_features(content, unit)
        fit_rows = np.setdiff1d(train_rows, report.valid_rows)
        calibration = fit_calibration(features, id_embeddings, fit_rows, report.valid_rows, probes)
        stand_ins = calibration.apply(features) * has_content[:, None]
        stand_ins[0] = 0.0
    retrieval, _ = augmented_item_matrix(
        id_embeddings, stand_ins, item_counts, config.min_interactions
    )
    by_name = dict(zip(content.modalities, content.mask.T, strict=True))
    modality_mask = np.stack(
        [by_name.get(m, np.zeros(rows, dtype=bool)) if m != "id" else warm for m in MODALITIES],
        axis=1,
    ).astype(np.uint8)
    items = ItemEmbeddings(embeddings, retrieval, modality_mask)
    return ItemEnrichmentResult(items, encoder, report, scale, method, calibration)


def calibration_features(content: ContentFeatures, unit: np.ndarray) -> np.ndarray:
    """What the cold-start map reads: the fused vector next to the raw tower outputs."""
    return np.concatenate([unit, *content.features.values()], axis=1).astype(np.float32)


def calibrated_scale(
    users: np.ndarray, id_embeddings: np.ndarray, unit_content: np.ndarray, rows: np.ndarray
) -> float | None:
    """Least-squares slope of ``user . id`` on ``user . content`` over ``rows``.

    ``rows`` must be items the fusion encoder did not train on, or the slope is optimistic.
    None when it is not a usable (positive, finite) scale.
    """
    if len(rows) == 0:
        return None
    users = np.asarray(users, dtype=np.float64)
    by_id = users @ id_embeddings[rows].T.astype(np.float64)
    by_content = users @ unit_content[rows].T.astype(np.float64)
    denominator = float((by_content**2).sum())
    if denominator <= 0:
        return None
    slope = float((by_id * by_content).sum() / denominator)
    return slope if np.isfinite(slope) and slope > 0 else None


def save_fusion(encoder: FusionEncoder, path: Path, id_scale: float) -> None:
    """Fusion weights (to encode new items later without retraining) + their shapes."""
    from safetensors.torch import save_file as save_torch

    save_torch(
        {k: v.contiguous() for k, v in encoder.state_dict().items()},
        str(path),
        metadata={
            "in_dims": json.dumps(encoder.in_dims),
            "out_dim": str(encoder.out_dim),
            "hidden": str(encoder.hidden),
            "id_scale": repr(id_scale),
        },
    )


def load_fusion(path: Path) -> tuple[FusionEncoder, float]:
    """The encoder saved by :func:`save_fusion` and the ID-norm scale of its outputs."""
    from safetensors import safe_open
    from safetensors.torch import load_file as load_torch

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    encoder = FusionEncoder(
        json.loads(meta["in_dims"]), int(meta["out_dim"]), hidden=int(meta["hidden"])
    )
    encoder.load_state_dict(load_torch(str(path)))
    return encoder.eval(), float(meta["id_scale"])
