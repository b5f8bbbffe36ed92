"""What every sequence encoder shares: the tied item table, left padding, last-position encoding.

Sequences are LEFT-padded with 0 (the padding index) so the newest item is always the last
column; a history shorter than the batch's longest gives the same user vector padded or not.
Scores are inner products with the item table, so a Faiss inner-product index is exact.
"""

from __future__ import annotations

import torch
from torch import nn

from tandem.data import PADDING_INDEX


def truncated_normal_(tensor: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """BERT-style init (values cut at two standard deviations), as LlamaRec's retrievers use."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2 * std, b=2 * std)


class FeedForward(nn.Module):
    """Position-wise two-layer MLP with GELU; residual and LayerNorm are the caller's choice."""

    def __init__(self, hidden: int, dropout: float, mult: int = 4):
        super().__init__()
        self.inner = nn.Linear(hidden, hidden * mult)
        self.outer = nn.Linear(hidden * mult, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.outer(self.dropout(nn.functional.gelu(self.inner(x)))))


class SequenceEncoder(nn.Module):
    """Base class: ``hidden_states(seq [B, L]) -> [B, L, d]``; tied ``item_embedding`` table."""

    max_len: int

    def __init__(self, num_items: int, hidden: int, max_len: int):
        super().__init__()
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        self.num_items = num_items
        self.hidden = hidden
        self.max_len = max_len
        self.item_embedding = nn.Embedding(num_items + 1, hidden, padding_idx=PADDING_INDEX)

    def init_weights(self) -> None:
        """Truncated-normal weights, zero biases, unit LayerNorms, zero padding row."""
        for name, param in self.named_parameters():
            if "norm" in name or name.endswith("_log"):
                continue
            if name.endswith("bias"):
                nn.init.zeros_(param)
            else:
                truncated_normal_(param)
        with torch.no_grad():
            self.item_embedding.weight[PADDING_INDEX].zero_()

    def hidden_states(self, seq: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, seq: torch.Tensor) -> torch.Tensor:
        """User vectors ``[B, d]``: the hidden state at the last (newest) position."""
        return self.hidden_states(seq[:, -self.max_len :])[:, -1]

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        return self.encode(seq)

    def item_embeddings(self) -> torch.Tensor:
        """The tied item table ``[num_items + 1, d]``; row 0 is padding."""
        return self.item_embedding.weight

    def scores(self, seq: torch.Tensor) -> torch.Tensor:
        """Inner-product scores of every item for each sequence, ``[B, num_items + 1]``."""
        return self.encode(seq) @ self.item_embeddings().T
