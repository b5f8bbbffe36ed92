"""SASRec (Kang & McAuley, 2018): a causal Transformer over the item sequence.

Pre-LayerNorm blocks, learned absolute positions counted from the NEWEST item (so the last
position always has the same embedding, padded or not), and full-softmax training over all
items with the item table tied to the output (Petrov & Macdonald's "SASRec with CE" recipe).
Attention is written out with plain ops so the ONNX export keeps dynamic batch and length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from retriever.models.base import FeedForward, SequenceEncoder
from tandem.data import PADDING_INDEX

_MASKED = -1e9  # finite "minus infinity": a fully masked row must not turn into NaN


@dataclass
class SASRecConfig:
    max_len: int = 200  # longest history read; older items are dropped
    hidden: int = 64  # embedding and model width d (the user/item vector size)
    layers: int = 2  # Transformer blocks
    heads: int = 2  # attention heads; must divide hidden
    dropout: float = 0.2  # on embeddings, attention weights and block outputs


class CausalSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.scale = 1.0 / math.sqrt(hidden // heads)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """``allowed [B, 1, L, L]``: query i may read key j."""
        batch, length, hidden = x.shape
        q, k, v = self.qkv(x).split(hidden, dim=-1)
        q, k, v = (t.reshape(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        weights = (q @ k.transpose(-2, -1)) * self.scale
        weights = weights.masked_fill(~allowed, _MASKED).softmax(dim=-1)
        mixed = self.dropout(weights) @ v
        return self.out(mixed.transpose(1, 2).reshape(batch, length, hidden))


class SASRecBlock(nn.Module):
    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.hidden)
        self.attn = CausalSelfAttention(config.hidden, config.heads, config.dropout)
        self.ffn_norm = nn.LayerNorm(config.hidden)
        self.ffn = FeedForward(config.hidden, config.dropout)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), allowed))
        return x + self.ffn(self.ffn_norm(x))


class SASRec(SequenceEncoder):
    def __init__(self, num_items: int, config: SASRecConfig | None = None):
        config = config or SASRecConfig()
        super().__init__(num_items, config.hidden, config.max_len)
        self.config = config
        self.position_embedding = nn.Embedding(config.max_len, config.hidden)
        self.embed_norm = nn.LayerNorm(config.hidden)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(SASRecBlock(config) for _ in range(config.layers))
        self.final_norm = nn.LayerNorm(config.hidden)
        self.init_weights()

    def hidden_states(self, seq: torch.Tensor) -> torch.Tensor:
        length = seq.shape[1]
        steps = torch.arange(length, device=seq.device)
        # Position 0 is the newest item: right-aligned, so padding never shifts positions.
        positions = (length - 1) - steps
        x = self.item_embedding(seq) + self.position_embedding(positions)[None]
        x = self.embed_dropout(self.embed_norm(x))
        real = seq != PADDING_INDEX
        causal = steps[None, :] <= steps[:, None]
        # A padding query reads itself only, so no row is fully masked.
        allowed = causal[None] & (real[:, None, :] | (steps[None, :] == steps[:, None])[None])
        allowed = allowed[:, None]
        for block in self.blocks:
            x = block(x, allowed)
        return self.final_norm(x)
