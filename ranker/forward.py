"""One forward pass over a batch of hybrid prompts -> letter log-probabilities.

Shared by the in-process backend (no grad) and training (grad through LoRA and projectors).
Prompts are left-padded with an attention mask and explicit position ids, so the last position
is every prompt's answer slot and a prompt scores the same alone or in a batch. Soft rows
replace the input embeddings of their placeholder tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

from ranker.backends.base import RenderedPrompt


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L] left-padded
    attention_mask: torch.Tensor  # [B, L] 1 on real tokens
    position_ids: torch.Tensor  # [B, L] 0.. on real tokens
    soft_index: tuple[torch.Tensor, torch.Tensor]  # (row, column) of each soft slot, batch order
    letter_ids: torch.Tensor  # [B, C] letter token ids, padded with 0
    letter_mask: torch.Tensor  # [B, C] True on real letters

    def to(self, device: str | torch.device) -> Batch:
        """The same batch on ``device`` (collation runs on the CPU; a GPU run moves it once)."""
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            (self.soft_index[0].to(device), self.soft_index[1].to(device)),
            self.letter_ids.to(device),
            self.letter_mask.to(device),
        )


def collate(
    token_ids: Sequence[Sequence[int]],
    soft_positions: Sequence[Sequence[int]],
    letter_token_ids: Sequence[Sequence[int]],
    pad_id: int,
) -> Batch:
    """Left-pad a batch; soft slots are listed prompt by prompt, in position order."""
    size = len(token_ids)
    length = max(len(ids) for ids in token_ids)
    width = max(len(letters) for letters in letter_token_ids)
    input_ids = torch.full((size, length), pad_id, dtype=torch.long)
    mask = torch.zeros((size, length), dtype=torch.long)
    letters = torch.zeros((size, width), dtype=torch.long)
    letter_mask = torch.zeros((size, width), dtype=torch.bool)
    rows, cols = [], []
    for b, ids in enumerate(token_ids):
        offset = length - len(ids)
        input_ids[b, offset:] = torch.as_tensor(ids, dtype=torch.long)
        mask[b, offset:] = 1
        rows.extend([b] * len(soft_positions[b]))
        cols.extend(offset + p for p in soft_positions[b])
        letters[b, : len(letter_token_ids[b])] = torch.as_tensor(letter_token_ids[b])
        letter_mask[b, : len(letter_token_ids[b])] = True
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    soft_index = (torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long))
    return Batch(input_ids, mask, positions, soft_index, letters, letter_mask)


def collate_prompts(prompts: Sequence[RenderedPrompt], pad_id: int) -> tuple[Batch, torch.Tensor]:
    """A batch of rendered prompts and their soft rows stacked in batch order (float32)."""
    batch = collate(
        [p.token_ids for p in prompts],
        [p.soft_positions for p in prompts],
        [p.letter_token_ids for p in prompts],
        pad_id,
    )
    vectors = [torch.as_tensor(p.soft_vectors) for p in prompts if p.soft_positions]
    soft = torch.cat(vectors).float() if vectors else torch.zeros((0, 0))
    return batch, soft


@cache
def cpu_has_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX).

    Without it torch emulates bf16 and autocast is slower than fp32 (on an AVX2-only host,
    SmolLM2 took 4.5 s per 380-token prompt in bf16: benchmarks/results/ranker_speed.md), so
    ``auto`` picks fp32 there.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: str = "cpu") -> str:
    """``auto`` -> bf16 where the device computes it natively, else fp32; ``bf16`` and ``fp32``
    stay."""
    if precision == "auto":
        if torch.device(device).type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if cpu_has_bf16() else "fp32"
    if precision in ("bf16", "fp32"):
        return precision
    raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")


def autocast(precision: str, device: str = "cpu"):
    """bf16 autocast on ``device``, or nothing for fp32 (``auto`` resolves by the device)."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()


def letter_logits(model, batch: Batch, soft_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Last-position logits of each prompt's letters, ``[B, C]`` float32 (-inf on padding)."""
    embeds = model.get_input_embeddings()(batch.input_ids)
    if soft_rows is not None and soft_rows.numel():
        if soft_rows.shape != (len(batch.soft_index[0]), embeds.shape[-1]):
            raise ValueError(
                f"soft rows {tuple(soft_rows.shape)} do not match "
                f"{len(batch.soft_index[0])} slots of hidden size {embeds.shape[-1]}"
            )
        embeds = embeds.index_put(batch.soft_index, soft_rows.to(embeds.dtype))
    out = model.get_decoder()(
        inputs_embeds=embeds,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    # Only the letters' rows of the LM head: a full-vocabulary head costs more than the whole
    # 2-layer decoder (49k x 576 per prompt, and its gradient) and is thrown away but 20 logits.
    last = out.last_hidden_state[:, -1, :]
    head = model.get_output_embeddings()
    picked = torch.einsum("bh,bch->bc", last, head.weight[batch.letter_ids]).float()
    if getattr(head, "bias", None) is not None:
        picked = picked + head.bias[batch.letter_ids].float()
    return picked.masked_fill(~batch.letter_mask, float("-inf"))


def letter_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the letters only (the verbalizer's score)."""
    return torch.log_softmax(logits, dim=-1)


def soft_groups(layouts, projectors: dict):
    """The soft rows of ``layouts`` (``PromptLayout``) grouped by kind, each group checked
    against its projector: ``(projector, row numbers in batch order, inputs [n, in_dim]
    float32, slots [n])`` per kind. ``projectors`` maps a kind to anything with a ``config``
    (a ``Projector``, or its ``ProjectorArrays`` when serving)."""
    kinds = [kind for layout in layouts for kind in layout.soft_kinds]
    raws = [raw for layout in layouts for raw in layout.soft_inputs]
    slots = [
        slot for layout in layouts for slot in (layout.soft_slots or (-1,) * len(layout.soft_kinds))
    ]
    groups = []
    for kind in sorted(set(kinds)):
        projector = projectors.get(kind)
        if projector is None:
            raise ValueError(f"a {kind} soft slot but no {kind} projector")
        rows = [n for n, k in enumerate(kinds) if k == kind]
        inputs = np.stack([raws[n] for n in rows]).astype(np.float32)
        if inputs.shape[1] != projector.config.in_dim:
            raise ValueError(
                f"{kind} embeddings have size {inputs.shape[1]}, the projector expects "
                f"{projector.config.in_dim}"
            )
        groups.append((projector, rows, inputs, np.asarray([slots[n] for n in rows])))
    return groups


def project_soft_rows(
    layouts, projectors: dict, hidden: int, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Soft rows of ``layouts`` (``PromptLayout``) in batch order, each through its projector
    (which lives on ``device``).

    Rows of one kind go through their projector together; gradients flow when enabled.
    """
    groups = soft_groups(layouts, projectors)
    if not groups:
        return torch.zeros((0, hidden), device=device)
    parts, index = [], []
    for projector, rows, inputs, slots in groups:
        x = torch.from_numpy(inputs).to(device)
        if projector.config.anchors:
            parts.append(projector(x, torch.as_tensor(slots, device=device)).float())
        else:
            parts.append(projector(x).float())
        index.extend(rows)
    stacked = torch.cat(parts)
    inverse = torch.empty(len(index), dtype=torch.long, device=device)
    inverse[torch.as_tensor(index, device=device)] = torch.arange(len(index), device=device)
    return stacked[inverse]
