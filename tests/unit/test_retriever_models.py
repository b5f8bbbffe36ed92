"""SASRec and LRURec: shapes, causality, padding invariance, and the LRU scan's arithmetic."""

from __future__ import annotations

import pytest
import torch

from retriever.models import LRURec, SASRec, build_model, model_config
from retriever.models.lrurec import CHUNK, LRULayer

MODELS = ("sasrec", "lrurec")
SMALL = {"max_len": 24, "hidden": 16, "layers": 2, "dropout": 0.0}


def small_model(name: str, num_items: int = 50, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, num_items, {**SMALL, **overrides}).eval()


@pytest.mark.parametrize("name", MODELS)
def test_encode_gives_one_vector_per_user_and_a_padded_item_table(name: str) -> None:
    model = small_model(name)
    vectors = model.encode(torch.randint(1, 51, (3, 10)))
    assert vectors.shape == (3, 16)
    table = model.item_embeddings()
    assert table.shape == (51, 16)
    assert torch.all(table[0] == 0)
    scores = model.scores(torch.randint(1, 51, (2, 5)))
    assert scores.shape == (2, 51)


@pytest.mark.parametrize("name", MODELS)
def test_left_padding_does_not_change_the_user_vector(name: str) -> None:
    model = small_model(name)
    seq = torch.randint(1, 51, (4, 9))
    padded = torch.cat([torch.zeros(4, 11, dtype=torch.long), seq], dim=1)
    torch.testing.assert_close(model.encode(seq), model.encode(padded), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_only_the_last_max_len_items_count(name: str) -> None:
    model = small_model(name)
    seq = torch.randint(1, 51, (2, 60))
    torch.testing.assert_close(model.encode(seq), model.encode(seq[:, -24:]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_hidden_states_are_causal(name: str) -> None:
    model = small_model(name)
    seq = torch.randint(1, 51, (1, 12))
    changed = seq.clone()
    changed[0, 8:] = torch.randint(1, 51, (4,))
    before, after = model.hidden_states(seq), model.hidden_states(changed)
    torch.testing.assert_close(before[:, :8], after[:, :8], atol=1e-5, rtol=0)
    assert not torch.allclose(before[:, 8:], after[:, 8:])


@pytest.mark.parametrize("name", MODELS)
def test_same_seed_same_weights(name: str) -> None:
    first, second = small_model(name), small_model(name)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def _sequential_lru(layer: LRULayer, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The textbook recurrence, step by step in complex arithmetic."""
    gamma = torch.exp(layer.gamma_log).repeat_interleave(2)
    u = (layer.in_proj(x) * gamma * real[..., None]).reshape(*x.shape[:2], layer.state, 2)
    lam = torch.exp(torch.complex(-torch.exp(layer.nu_log), torch.exp(layer.theta_log)))
    state = torch.zeros(x.shape[0], layer.state, dtype=torch.cfloat)
    outputs = []
    for t in range(x.shape[1]):
        state = lam * state + torch.complex(u[:, t, :, 0], u[:, t, :, 1])
        outputs.append(state)
    h = torch.stack(outputs, dim=1)
    h = torch.stack([h.real, h.imag], dim=-1).reshape(*x.shape[:2], -1)
    return layer.norm(layer.out_proj(h) + x)


@pytest.mark.parametrize("length", [CHUNK, 3 * CHUNK, 13 * CHUNK])
def test_lru_scan_equals_the_sequential_recurrence(length: int) -> None:
    torch.manual_seed(1)
    layer = LRULayer(hidden=8, dropout=0.0, r_min=0.8, r_max=0.99).eval()
    x = torch.randn(2, length, 8)
    real = torch.ones(2, length)
    real[0, :5] = 0
    with torch.no_grad():
        expected = _sequential_lru(layer, x, real)
        torch.testing.assert_close(layer(x, real), expected, atol=1e-4, rtol=0)
        layer.matmul_scan = True
        torch.testing.assert_close(layer(x, real), expected, atol=1e-4, rtol=0)
        layer.freeze(length)
        torch.testing.assert_close(layer(x, real), expected, atol=1e-4, rtol=0)


def test_lru_export_preparation_keeps_outputs() -> None:
    model = small_model("lrurec")
    seq = torch.randint(1, 51, (3, 7))
    before = model.encode(seq)
    model.prepare_export()
    torch.testing.assert_close(model.encode(seq), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("length", [5, 24, 60])
def test_lru_user_vector_is_the_last_hidden_state(length: int) -> None:
    """``encode`` runs the last block at the newest step only: the same vector as every
    step's hidden state, read at the end (eager, and with the export's frozen matrices)."""
    model = small_model("lrurec")
    seq = torch.randint(1, 51, (3, length))
    seq[0, : length // 2] = 0  # a left-padded history
    with torch.no_grad():
        expected = model.hidden_states(seq[:, -24:])[:, -1]
        torch.testing.assert_close(model.encode(seq), expected, atol=1e-5, rtol=0)
        model.prepare_export()
        torch.testing.assert_close(model.encode(seq), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            model.hidden_states(seq[:, -24:])[:, -1], expected, atol=1e-5, rtol=0
        )


def test_lru_parameters_get_gradients() -> None:
    model = small_model("lrurec").train()
    model.scores(torch.randint(1, 51, (2, 20))).logsumexp(-1).sum().backward()
    lru = model.blocks[0].lru
    for param in (lru.nu_log, lru.theta_log, lru.gamma_log, lru.in_proj.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_model_classes_and_bad_options() -> None:
    assert isinstance(small_model("sasrec"), SASRec)
    assert isinstance(small_model("lrurec"), LRURec)
    with pytest.raises(ValueError, match="unknown retriever model"):
        model_config("gru4rec")
    with pytest.raises(ValueError, match="no option"):
        model_config("lrurec", {"heads": 2})
    with pytest.raises(ValueError, match="divisible"):
        build_model("sasrec", 10, {"hidden": 10, "heads": 3})
