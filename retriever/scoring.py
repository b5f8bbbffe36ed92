"""Batch scoring of histories with a torch encoder, for validation and offline evaluation."""

from __future__ import annotations

import numpy as np
import torch

from retriever.models import SequenceEncoder
from retriever.windows import left_pad
from tandem.evaluate import ScoreFn


def encode_histories(model: SequenceEncoder, histories: list[np.ndarray]) -> np.ndarray:
    """User vectors ``[B, d]`` (float32) from oldest-first internal-index histories."""
    if any(len(h) == 0 for h in histories):
        raise ValueError("every history needs at least one item (use popularity for cold users)")
    longest = max(len(h) for h in histories)
    seq = torch.from_numpy(left_pad(histories, min(longest, model.max_len)))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return model.encode(seq).float().numpy()
    finally:
        model.train(was_training)


def torch_score_fn(model: SequenceEncoder) -> ScoreFn:
    """``histories -> [B, num_items + 1]`` inner-product scores with the model's item table."""

    def score(histories: list[np.ndarray]) -> np.ndarray:
        vectors = encode_histories(model, histories)
        with torch.inference_mode():
            items = model.item_embeddings().detach().float().numpy()
        return vectors @ items.T

    return score
