"""LRURec (Yue et al., 2024; the retriever of LlamaRec and MLLM4Rec): linear recurrent units.

Each block is an LRU layer (Orvieto et al., 2023) followed by a position-wise feed-forward net,
both with residual + LayerNorm. The LRU keeps a complex diagonal state per channel,

    h_t = lambda * h_{t-1} + gamma * (B x_t),     y_t = Re(C h_t) + x_t,

with ``lambda = exp(-nu + i theta)`` (|lambda| < 1, stable by construction). Complex numbers
are written as (real, imaginary) pairs (ONNX has no complex dtype) and the recurrence runs as a
chunked parallel scan (batched matmuls, no loop over time). Padding positions feed nothing into the
state, so left padding never changes a user's vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from retriever.models.base import FeedForward, SequenceEncoder
from tandem.data import PADDING_INDEX

CHUNK = 16  # scan chunk: steps handled by one small causal kernel


@dataclass
class LRURecConfig:
    max_len: int = 200  # longest history read; older items are dropped
    hidden: int = 64  # embedding and model width d (the user/item vector size)
    layers: int = 2  # LRU + feed-forward blocks
    dropout: float = 0.2  # on embeddings and block outputs
    r_min: float = 0.8  # smallest initial |lambda|: fastest-forgetting channel
    r_max: float = 0.99  # largest initial |lambda|: longest memory


class LRULayer(nn.Module):
    """One LRU with ``2 * hidden`` complex state channels, residual + post-LayerNorm.

    Complex values live in interleaved (Re, Im) channel pairs: ``[..., state, 2]`` flattened.
    """

    def __init__(self, hidden: int, dropout: float, r_min: float, r_max: float):
        super().__init__()
        state = 2 * hidden
        self.state = state
        u1, u2 = torch.rand(state), torch.rand(state)
        # |lambda| uniform on the ring [r_min, r_max], phase uniform in [0, 2 pi).
        nu = -0.5 * torch.log(u1 * (r_max**2 - r_min**2) + r_min**2)
        theta = u2 * 2 * math.pi
        gamma = torch.sqrt(1 - torch.exp(-2 * nu))  # normalises the input so ||h|| stays O(1)
        self.nu_log = nn.Parameter(torch.log(nu))
        self.theta_log = nn.Parameter(torch.log(theta.clamp_min(1e-4)))
        self.gamma_log = nn.Parameter(torch.log(gamma))
        self.in_proj = nn.Linear(hidden, 2 * state)  # B x as (Re, Im) pairs
        self.out_proj = nn.Linear(2 * state, hidden)  # Re(C h) from the (Re, Im) pairs of h
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden)
        self.matmul_scan = False  # the export switches to the matmul form (see scan_matmul)
        self.frozen: tuple[torch.Tensor, ...] = ()
        self.frozen_last: tuple[torch.Tensor, ...] = ()

    def powers(self, count: int, stride: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Re and Im of ``lambda^(stride * k)`` for k = 0..count-1, each ``[state, count]``."""
        k = torch.arange(count, device=self.nu_log.device).to(self.nu_log.dtype) * stride
        decay = torch.exp(-torch.exp(self.nu_log)[:, None] * k)
        angle = torch.exp(self.theta_log)[:, None] * k
        return decay * torch.cos(angle), decay * torch.sin(angle)

    def causal_conv(self, x: torch.Tensor, count: int, stride: int) -> torch.Tensor:
        """``y_t = sum_k lambda^(stride * k) x_{t-k}`` (k < count) on ``[N, 2 * state, T]``.

        A depthwise convolution: each state's (Re, Im) pair is one group, and the 2x2 weight
        ``[[Re, -Im], [Im, Re]]`` is multiplication by a complex number.
        """
        p_re, p_im = (p.flip(-1) for p in self.powers(count, stride))
        weight = torch.stack([torch.stack([p_re, -p_im], 1), torch.stack([p_im, p_re], 1)], 1)
        padded = nn.functional.pad(x, (count - 1, 0))
        return nn.functional.conv1d(
            padded, weight.reshape(2 * self.state, 2, count), groups=self.state
        )

    def scan(self, u: torch.Tensor) -> torch.Tensor:
        """``h_t = sum_{s<=t} lambda^(t-s) u_s`` on ``[B, L, 2 * state]``, L a multiple of CHUNK.

        Chunked: a causal convolution inside each chunk, the same recurrence over the chunks'
        final states (stride CHUNK), then each chunk adds the state carried in from before it.
        """
        length = u.shape[1]
        chunks = length // CHUNK
        pairs = 2 * self.state
        h = self.causal_conv(u.reshape(-1, CHUNK, pairs).transpose(1, 2), CHUNK, 1)
        h = h.reshape(-1, chunks, pairs, CHUNK)
        ends = h[..., -1].transpose(1, 2)  # [B, 2 * state, chunks]
        after = self.causal_conv(ends, chunks, CHUNK)  # state after each chunk
        entering = nn.functional.pad(after, (1, 0))[..., :chunks]
        entering = entering.transpose(1, 2).reshape(-1, chunks, self.state, 2, 1)
        c_re, c_im = entering[:, :, :, 0], entering[:, :, :, 1]
        p_re, p_im = (p[:, 1:] for p in self.powers(CHUNK + 1))  # lambda^1..lambda^CHUNK
        carry = torch.stack([p_re * c_re - p_im * c_im, p_re * c_im + p_im * c_re], dim=3)
        h = h.reshape(-1, chunks, self.state, 2, CHUNK) + carry
        return h.permute(0, 1, 4, 2, 3).reshape(-1, length, pairs)

    def decay_matrix(self, size: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Re, Im of ``lambda^(stride * (t - s))`` for s <= t, else 0: ``[state, size, size]``."""
        p_re, p_im = self.powers(size, stride)
        steps = torch.arange(size, device=p_re.device)
        lag = steps[:, None] - steps[None, :]
        causal = (lag >= 0).to(p_re.dtype)
        lag = lag.clamp_min(0)
        return p_re[:, lag] * causal, p_im[:, lag] * causal

    def scan_matmul(self, u: torch.Tensor) -> torch.Tensor:
        """The same chunked scan as ``scan``, as three real matmuls per layer.

        A complex matrix ``A`` acts on ``[Re; Im]`` as the real block matrix
        ``[[Re A, -Im A], [Im A, Re A]]``, so each complex step is ONE batched matmul over the
        states. onnxruntime runs this far faster than grouped convolutions, so the export uses
        it (with the matrices precomputed by ``freeze``); torch trains faster with ``scan``.
        Both give the same numbers (tested).
        """
        length = u.shape[1]
        chunks = length // CHUNK
        state = self.state
        intra, across, carry = self.scan_matrices(chunks)
        # Only 2-D transposes (batched): onnxruntime runs a general 5-D permutation ~5x slower.
        x = u.transpose(1, 2).reshape(-1, chunks, CHUNK).transpose(1, 2)  # [(B, pair), step, chunk]
        h = intra @ x.reshape(-1, state, 2 * CHUNK, chunks)  # [B, state, (Re|Im, step), chunk]
        ends = h.reshape(-1, state, 2, CHUNK, chunks)[:, :, :, -1]  # each chunk's last step
        after = across @ ends.reshape(-1, state, 2 * chunks, 1)  # the state after each chunk
        entering = nn.functional.pad(after.reshape(-1, state, 2, chunks), (1, 0))[..., :chunks]
        h = h + carry @ entering
        h = h.reshape(-1, CHUNK, chunks).transpose(1, 2)  # [(B, pair), chunk, step]
        return h.reshape(-1, 2 * state, length).transpose(1, 2)

    def scan_matrices(self, chunks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Real block forms of: decay inside a chunk ``[state, 2C, 2C]``, decay across
        chunks ``[state, 2n, 2n]``, and lambda^1..lambda^C applied to a carried state
        ``[state, 2C, 2]`` (from ``freeze``'s matrices when frozen)."""
        if self.frozen:
            intra, across_re, across_im, carry = self.frozen
            # lambda^(C (t - s)) depends on t - s only: n chunks read the top-left n x n.
            return (
                intra,
                _block(across_re[:, :chunks, :chunks], across_im[:, :chunks, :chunks]),
                carry,
            )
        p_re, p_im = (p[:, 1:] for p in self.powers(CHUNK + 1))
        carry = torch.cat(
            [torch.stack([p_re, -p_im], dim=2), torch.stack([p_im, p_re], dim=2)], dim=1
        )
        return (
            _block(*self.decay_matrix(CHUNK, 1)),
            _block(*self.decay_matrix(chunks, CHUNK)),
            carry,
        )

    def freeze(self, length: int) -> None:
        """Precompute the scan matrices for inputs of up to ``length`` steps (after training):
        a shorter input reads a slice of them, so the exported graph's cost follows the
        history's length instead of always paying for ``length``."""
        with torch.no_grad():
            intra, _, carry = self.scan_matrices(1)
            across = self.decay_matrix(length // CHUNK, CHUNK)
            self.frozen = tuple(t.detach().clone() for t in (intra, *across, carry))
            self.frozen_last = tuple(t.detach().clone() for t in self.last_weights(length))
        self.matmul_scan = True

    def drive(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """``gamma * (B x_t)`` per step as (Re, Im) pairs, ``[B, L, 2 * state]``; padding
        steps (``real`` 0) feed nothing into the state."""
        gamma = torch.exp(self.gamma_log).repeat_interleave(2)
        return self.in_proj(x) * gamma * real[..., None]

    def last_weights(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Re, Im of ``lambda^(length - 1 - t)`` for t = 0..length-1, each ``[length, state]``:
        what each step contributes to the final state."""
        p_re, p_im = self.powers(length)
        return p_re.flip(-1).T, p_im.flip(-1).T

    def last(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """The layer's output at the last position only, ``[B, d]``, from ``x [B, L, d]``.

        The final state is one weighted sum over the steps, ``h_L = sum_t lambda^(L-1-t) u_t``
        (no scan), which is all a user vector needs from the last block.
        """
        u = self.drive(x, real)
        u_re, u_im = u[..., 0::2], u[..., 1::2]  # [B, L, state]
        if self.frozen_last:  # lambda^(L-1-t) for the last L of the frozen steps
            w_re, w_im = (w[-x.shape[1] :] for w in self.frozen_last)
        else:
            w_re, w_im = self.last_weights(x.shape[1])
        h_re = (u_re * w_re).sum(1) - (u_im * w_im).sum(1)
        h_im = (u_im * w_re).sum(1) + (u_re * w_im).sum(1)
        h = torch.stack([h_re, h_im], dim=-1).reshape(x.shape[0], 2 * self.state)
        return self.norm(self.dropout(self.out_proj(h)) + x[:, -1])

    def forward(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """``x [B, L, d]`` with L a multiple of CHUNK; ``real [B, L]`` is 0 at padding."""
        u = self.drive(x, real)
        h = self.scan_matmul(u) if self.matmul_scan else self.scan(u)
        return self.norm(self.dropout(self.out_proj(h)) + x)


class LRUBlock(nn.Module):
    def __init__(self, config: LRURecConfig):
        super().__init__()
        self.lru = LRULayer(config.hidden, config.dropout, config.r_min, config.r_max)
        self.ffn = FeedForward(config.hidden, config.dropout)
        self.ffn_norm = nn.LayerNorm(config.hidden)

    def forward(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        x = self.lru(x, real)
        return self.ffn_norm(x + self.ffn(x))

    def last(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """``forward`` at the last position only: ``[B, d]``."""
        x = self.lru.last(x, real)
        return self.ffn_norm(x + self.ffn(x))


class LRURec(SequenceEncoder):
    def __init__(self, num_items: int, config: LRURecConfig | None = None):
        config = config or LRURecConfig()
        super().__init__(num_items, config.hidden, config.max_len)
        self.config = config
        self.embed_norm = nn.LayerNorm(config.hidden)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(LRUBlock(config) for _ in range(config.layers))
        self.init_weights()

    def prepare_export(self) -> None:
        """Precompute the onnxruntime-friendly scan's matrices for up to max_len steps."""
        for block in self.blocks:
            block.lru.freeze(scan_length(self.max_len))

    def embedded(self, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Item embeddings of ``seq`` left-padded to the scan length, and its real-step mask."""
        # Left-pad to a multiple of CHUNK: padding feeds nothing into any state.
        padded = scan_length(seq.shape[1])
        seq = torch.cat([seq.new_zeros(seq.shape[0], padded), seq], dim=1)[:, -padded:]
        real = (seq != PADDING_INDEX).to(self.item_embedding.weight.dtype)
        return self.embed_norm(self.embed_dropout(self.item_embedding(seq))), real

    def hidden_states(self, seq: torch.Tensor) -> torch.Tensor:
        x, real = self.embedded(seq)
        for block in self.blocks:
            x = block(x, real)
        return x[:, -seq.shape[1] :]

    def encode(self, seq: torch.Tensor) -> torch.Tensor:
        """The user vector: every block but the last over all steps, the last block at the
        newest step only (``LRUBlock.last``): the same vector as ``hidden_states(seq)[:, -1]``
        for a fraction of the last block's work, which serving pays per request."""
        x, real = self.embedded(seq[:, -self.max_len :])
        for block in self.blocks[:-1]:
            x = block(x, real)
        return self.blocks[-1].last(x, real)


def scan_length(length: int) -> int:
    """The smallest multiple of CHUNK that holds ``length`` (>= 1) steps. Shape arithmetic
    only (no ``int()``, ``max`` or negation), so a traced graph keeps the length dynamic."""
    return (length + CHUNK - 1) // CHUNK * CHUNK


def _block(real: torch.Tensor, imag: torch.Tensor) -> torch.Tensor:
    """``[..., n, n]`` complex matrices as real ``[..., 2n, 2n]`` blocks acting on [Re; Im]."""
    return torch.cat([torch.cat([real, -imag], dim=-1), torch.cat([imag, real], dim=-1)], dim=-2)
