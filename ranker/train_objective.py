"""What training minimises and how fast: the ranker's loss and the learning-rate schedule.

Pure functions of tensors and counters, shared by real-data and synthetic training
(``ranker.train.fit``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

DECAY_FLOOR = 0.1  # the learning rates end a decay at this share of their base


def lr_factor(step: int, warmup: int, examples: int = 0, decay_examples: int = 0) -> float:
    """The learning rates' multiplier: linear warm-up over ``warmup`` steps, then 1, or a
    cosine from 1 down to ``DECAY_FLOOR`` over ``decay_examples`` examples seen."""
    factor = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if decay_examples > 0:
        progress = min(1.0, examples / decay_examples)
        factor *= DECAY_FLOOR + (1 - DECAY_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def ranker_loss(
    logits: torch.Tensor,
    labels: list[int],
    teacher: list[np.ndarray] | None,
    weight: float,
    probe: torch.Tensor | None = None,
    probe_weight: float = 0.0,
    residual: bool = False,
) -> torch.Tensor:
    """Cross-entropy on the true letter + ``weight`` * KL(softmax(teacher) || softmax(logits))
    + ``probe_weight`` * cross-entropy of the per-candidate probe. With ``residual`` the
    cross-entropies read ``log_softmax(teacher)`` plus the logits (``TrainConfig.residual``)."""
    target = torch.as_tensor(labels, device=logits.device)
    if residual:
        if teacher is None:
            raise ValueError("a residual ranker needs the retriever's scores of every prompt")
        offset = retriever_log_softmax(teacher).to(logits.device)
        logits = logits + offset
        probe = None if probe is None else probe + offset
    loss = torch.nn.functional.cross_entropy(logits, target)
    if probe is not None and probe_weight > 0:
        loss = loss + probe_weight * torch.nn.functional.cross_entropy(probe, target)
    if weight > 0 and teacher is not None:
        scores = torch.as_tensor(np.stack(teacher), dtype=torch.float32, device=logits.device)
        target = torch.softmax(scores, dim=-1)
        log_p = torch.log_softmax(logits, dim=-1)
        loss = loss + weight * torch.nn.functional.kl_div(log_p, target, reduction="batchmean")
    return loss


def retriever_log_softmax(scores: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """``[batch, n]`` log-softmax of retriever scores (the gateway's fusion reads the same)."""
    return torch.log_softmax(torch.as_tensor(np.stack(scores), dtype=torch.float32), dim=-1)
