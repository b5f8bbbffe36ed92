"""The exported user encoder gives torch's vectors (and so torch's top-20) at any batch/length."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from retriever.models import build_model
from retriever.onnx import OnnxUserEncoder, export_user_encoder
from retriever.windows import left_pad

NUM_ITEMS = 300


@pytest.mark.parametrize("name", ["sasrec", "lrurec"])
def test_onnx_matches_torch_vectors_and_top20(name: str, tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = build_model(name, NUM_ITEMS, {"max_len": 40, "hidden": 16, "layers": 2}).eval()
    encoder = OnnxUserEncoder(export_user_encoder(model, tmp_path / "user_encoder.onnx"))
    assert encoder.dim == 16
    rng = np.random.default_rng(0)
    items = model.item_embeddings().detach().numpy()
    for batch, length in [(1, 1), (1, 40), (5, 17), (3, 33)]:
        histories = [
            rng.integers(1, NUM_ITEMS + 1, rng.integers(1, length + 1)) for _ in range(batch)
        ]
        seq = left_pad(histories, length)
        with torch.no_grad():
            expected = model.encode(torch.from_numpy(seq)).numpy()
        got = encoder.encode(seq)
        assert got.shape == (batch, 16)
        assert np.abs(got - expected).max() < 1e-4
        top_onnx = np.argsort(-(got @ items.T), axis=1)[:, :20]
        top_torch = np.argsort(-(expected @ items.T), axis=1)[:, :20]
        np.testing.assert_array_equal(top_onnx, top_torch)


def test_export_leaves_the_model_trainable(tmp_path: Path) -> None:
    model = build_model("lrurec", NUM_ITEMS, {"max_len": 40, "hidden": 16, "layers": 1}).train()
    export_user_encoder(model, tmp_path / "user_encoder.onnx")
    assert model.training
    assert not model.blocks[0].lru.frozen
    assert not model.blocks[0].lru.matmul_scan
