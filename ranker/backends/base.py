"""The one interface every ranker backend implements, and the prompt it consumes.

A backend never builds prompts or runs the projector: it receives rendered prompts (token ids
plus soft vectors already in the LLM's hidden size) and returns, per prompt, the log-softmax of
the last position's logits over the candidates' letter tokens, in candidate order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt ready for one forward pass.

    ``token_ids`` is the whole prompt; at each index in ``soft_positions`` the token id is a
    placeholder whose input embedding is replaced by the matching row of ``soft_vectors``
    (float32, shape ``[len(soft_positions), hidden_size]``). ``letter_token_ids[i]`` is the
    token that names candidate ``i``. ``text`` is the rendered text (soft slots shown as the
    placeholder), kept for logs, golden tests and text-only backends.
    """

    token_ids: tuple[int, ...]
    letter_token_ids: tuple[int, ...]
    text: str = ""
    soft_positions: tuple[int, ...] = ()
    soft_vectors: np.ndarray | None = field(default=None, compare=False)

    @property
    def num_candidates(self) -> int:
        return len(self.letter_token_ids)

    @property
    def is_hybrid(self) -> bool:
        return bool(self.soft_positions)

    def __post_init__(self) -> None:
        n_soft = len(self.soft_positions)
        rows = 0 if self.soft_vectors is None else self.soft_vectors.shape[0]
        if n_soft != rows:
            raise ValueError(f"{n_soft} soft positions but {rows} soft vectors")
        if any(p < 0 or p >= len(self.token_ids) for p in self.soft_positions):
            raise ValueError("soft position outside the prompt")


class RankerError(Exception):
    """Base of the typed errors a gateway degrades on (never a hang, never a bare exception)."""


class RankerUnavailable(RankerError):
    """The backend cannot score now: down, crashed, circuit open, or over its deadline."""


class RankerTimeout(RankerUnavailable):
    """The backend gave no answer within the call's deadline (a slow or stuck server)."""


class RankerBadResponse(RankerError):
    """The backend answered, but not with usable letter scores (malformed body, 4xx)."""


@runtime_checkable
class RankerBackend(Protocol):
    """Scores batches of rendered prompts; safe to call concurrently from many requests."""

    name: str

    async def start(self) -> None:
        """Load weights / open connections and warm up; raise with a clear message on failure."""

    async def score(
        self,
        prompts: Sequence[RenderedPrompt],
        *,
        request_id: str | None = None,
        deadline_s: float | None = None,
    ) -> list[np.ndarray]:
        """Per prompt, float32 log-probabilities over its letters (length ``num_candidates``).

        ``request_id`` travels with the call where the backend can log or forward it (a header,
        an abort key); ``deadline_s`` is the caller's remaining budget, which a remote backend
        enforces itself and an in-process one leaves to the caller's cancellation.
        """
        ...

    async def ready(self) -> bool:
        """True when a score call is expected to succeed now."""
        ...

    async def close(self) -> None:
        """Release resources; idempotent."""
