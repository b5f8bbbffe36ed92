"""Start-up checks: the server serves our model, reads prompts as we write them, and is warm.

Prompts are tokenized and embedded locally, so a server started from other weights or another
tokenizer would score garbage without an error. Before the first request the client checks that
the server tokenizes a probe like the local model, and that the same tokens sent as ids and as
embeddings score alike (so the local embedding table is the server's). The warm-up request has
at least 15 tokens: a very short FIRST request can kill vLLM's CPU worker (SIGILL, RECIPES).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ranker.backends.base import RenderedPrompt
from ranker.backends.vllm.errors import ModelMismatchError, VLLMBadResponse, VLLMUnavailable
from ranker.backends.vllm.transport import Transport
from ranker.backends.vllm.wire import EmbeddingTable, completion_body, letter_scores

# Common prompt words (merged differently by different vocabularies), letters, digits, unicode.
PROBE_TEXT = (
    "You are a movie recommender system. The user has watched the following movies: "
    "Toy Story (1995). Candidates: A. B. C. D. E. F. G. H. I. J. K. L. M. N. O. P. Q. R. "
    "S. T. Answer with the index letter. 0123456789 Ünïcödé ok."
)
WARMUP_TOKENS = 32  # RECIPES: a very short FIRST request can kill the CPU worker (SIGILL)
HEALTH_POLL_S = 0.5


@dataclass(frozen=True)
class ServedModels:
    """What ``/v1/models`` says: the base model, its context length, every served name."""

    base: str
    max_model_len: int  # 0 when the server does not say
    names: list[str]


def local_tokens(model_dir: Path, text: str) -> list[int]:
    """``text`` tokenized by the local model's tokenizer, without special tokens (blocking)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return list(tokenizer.encode(text, add_special_tokens=False))


async def wait_healthy(transport: Transport, wait_s: float) -> None:
    """Poll ``/health`` until it answers 200; VLLMUnavailable after ``wait_s``."""
    give_up = time.monotonic() + wait_s
    while (problem := await transport.health()) is not None:
        if time.monotonic() >= give_up:
            raise VLLMUnavailable(
                "connect", f"vLLM at {transport.base_url} is not healthy ({problem})"
            )
        await asyncio.sleep(HEALTH_POLL_S)


async def served_models(transport: Transport) -> ServedModels:
    answer = await transport.request("GET", "/v1/models")
    try:
        models = list(answer["data"])
        base = next(m for m in models if not m.get("parent"))
        return ServedModels(
            base=str(base["id"]),
            max_model_len=int(base.get("max_model_len") or 0),
            names=[str(m.get("id")) for m in models],
        )
    except (KeyError, TypeError, ValueError, StopIteration):
        raise VLLMBadResponse("malformed", f"/v1/models answered {str(answer)[:200]}") from None


async def check_tokenizer(
    transport: Transport,
    base_model: str,
    local_probe: list[int],
    table: EmbeddingTable,
    model_dir: Path,
) -> None:
    """The server tokenizes PROBE_TEXT exactly as ``model_dir`` does."""
    answer = await transport.request(
        "POST",
        "/tokenize",
        {"model": base_model, "prompt": PROBE_TEXT, "add_special_tokens": False},
    )
    remote = answer.get("tokens") if isinstance(answer, dict) else None
    if remote != local_probe:
        raise ModelMismatchError(
            f"the server's tokenizer differs from {model_dir}: the probe tokenizes to {remote} "
            f"there and {local_probe} here. Point the client at the model directory the server "
            "was started from."
        )
    if max(local_probe) >= table.vocab_size:
        raise ModelMismatchError("the local embedding table is smaller than the vocabulary")


async def warm_up(
    transport: Transport,
    table: EmbeddingTable,
    probe: list[int],
    *,
    base_model: str,
    model: str,
    logprobs: int,
    tolerance: float,
    model_dir: Path,
) -> None:
    """A >= 15-token first request; token ids and embeddings must score alike; warm ``model``."""
    ids = (probe * (WARMUP_TOKENS // len(probe) + 1))[:WARMUP_TOKENS]
    letters = tuple(dict.fromkeys(probe))[:8]
    text = RenderedPrompt(token_ids=tuple(ids), letter_token_ids=letters)
    soft = table.prompt_rows(text).float().numpy()[:1]
    hybrid = RenderedPrompt(
        token_ids=tuple(ids), letter_token_ids=letters, soft_positions=(0,), soft_vectors=soft
    )

    async def scores(prompt: RenderedPrompt, name: str) -> Any:
        body = completion_body(prompt, name, logprobs, table)
        return await transport.request("POST", "/v1/completions", body)

    by_ids = letter_scores(await scores(text, base_model), letters)
    by_embeds = letter_scores(await scores(hybrid, base_model), letters)
    gap = float(np.max(np.abs(by_ids - by_embeds)))
    if gap > tolerance:
        raise ModelMismatchError(
            f"prompt embeddings from {model_dir} score {gap:.3f} nats away from the same tokens "
            "sent as ids: the server runs other weights than the local copy"
        )
    if model != base_model:
        await scores(hybrid, model)
