"""vLLM's wire format for letter scoring: the completion body and how its answer is read.

Each prompt is scored in one forward pass: ``max_tokens=1``, ``temperature=0``, the sampler
restricted to the prompt's letter tokens (``allowed_token_ids``) and their log-probabilities
returned (``logprobs=20``, ``return_tokens_as_token_ids``). The server runs with
``--logprobs-mode processed_logprobs``, so those are already the log-softmax over the letters;
``letter_scores`` renormalises over the letters anyway, so a server in raw mode yields the same
scores.

A letter missing from the answer is a bad response, not a floor score: with at most 20 allowed
tokens and ``logprobs=20`` every letter is always returned, so a missing one means the server
broke the contract (wrong logprobs mode, allowed ids ignored) and a guessed score would silently
corrupt the ranking; the gateway falls back to retriever order instead.

Text-only prompts go as token ids. Hybrid prompts go as ``prompt_embeds`` (base64 of
``torch.save(tensor[n_tokens, hidden])``): rows of the base model's input embedding table, held
once in bf16, with the soft rows put in. Building that body is CPU work (a gather, a
``torch.save``, base64): callers run ``completion_body`` off the event loop.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ranker.backends.base import RenderedPrompt
from ranker.backends.vllm.errors import VLLMBadResponse

_TOKEN_KEY = re.compile(r"^token_id:(-?\d+)$")


class EmbeddingTable:
    """The base model's input embedding table in bf16, read alone from the safetensors files."""

    KEY_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")

    def __init__(self, weight: Any):
        self.weight = weight  # torch.Tensor [vocab, hidden] bfloat16

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    @classmethod
    def load(cls, model_dir: Path) -> EmbeddingTable:
        import torch
        from safetensors import safe_open

        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            single = model_dir / "model.safetensors"
            if not single.is_file():
                raise FileNotFoundError(f"{model_dir} has no model.safetensors(.index.json)")
            with safe_open(single, "pt") as handle:
                weight_map = dict.fromkeys(handle.keys(), single.name)
        keys = [k for k in weight_map if k.endswith(cls.KEY_SUFFIXES)]
        if not keys:
            raise ValueError(f"no input embedding tensor in {model_dir} (looked for *embed_tokens)")
        key = min(keys, key=len)
        with safe_open(model_dir / weight_map[key], "pt") as handle:
            weight = handle.get_tensor(key)
        return cls(weight.to(torch.bfloat16).contiguous())

    def prompt_rows(self, prompt: RenderedPrompt) -> Any:
        """``[n_tokens, hidden]`` bf16: the tokens' embeddings with the soft rows put in."""
        import torch

        ids = torch.as_tensor(prompt.token_ids, dtype=torch.long)
        if ids.numel() and (int(ids.max()) >= self.vocab_size or int(ids.min()) < 0):
            raise ValueError(f"token id outside the embedding table (vocab {self.vocab_size})")
        rows = self.weight[ids]  # advanced indexing copies: torch.save sends only these rows
        if prompt.soft_positions:
            soft = torch.as_tensor(np.asarray(prompt.soft_vectors, dtype=np.float32))
            if soft.shape[1] != self.hidden_size:
                raise ValueError(
                    f"soft vectors have width {soft.shape[1]}, the model's hidden size is "
                    f"{self.hidden_size}: project them first"
                )
            rows[torch.as_tensor(prompt.soft_positions, dtype=torch.long)] = soft.to(rows.dtype)
        return rows


def encode_prompt_embeds(tensor: Any) -> str:
    """vLLM's ``prompt_embeds`` wire format: base64 of ``torch.save(tensor)``."""
    import torch

    buffer = io.BytesIO()
    torch.save(tensor.contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def completion_body(
    prompt: RenderedPrompt, model: str, logprobs: int, table: EmbeddingTable
) -> dict[str, Any]:
    """The ``/v1/completions`` body that scores ``prompt``'s letters with ``model``."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": 1,
        "temperature": 0.0,
        "logprobs": logprobs,
        "allowed_token_ids": list(dict.fromkeys(prompt.letter_token_ids)),
        "return_tokens_as_token_ids": True,
    }
    if prompt.is_hybrid:
        body["prompt_embeds"] = encode_prompt_embeds(table.prompt_rows(prompt))
    else:
        body["prompt"] = list(prompt.token_ids)
    return body


def letter_scores(body: Any, letter_token_ids: Sequence[int]) -> np.ndarray:
    """The letters' log-softmax (float32, candidate order) from a completion body."""
    try:
        top = body["choices"][0]["logprobs"]["top_logprobs"][0]
    except (KeyError, IndexError, TypeError) as exc:
        raise VLLMBadResponse("malformed", f"completion has no top_logprobs ({exc!r})") from None
    if not isinstance(top, dict):
        raise VLLMBadResponse("malformed", "top_logprobs[0] is not an object")
    found: dict[int, float] = {}
    for key, value in top.items():
        match = _TOKEN_KEY.match(str(key))
        if match is None or not isinstance(value, int | float) or isinstance(value, bool):
            raise VLLMBadResponse("malformed", f"unexpected logprob entry {key!r}: {value!r}")
        found[int(match.group(1))] = float(value)
    raw = np.array([found.get(t, math.nan) for t in letter_token_ids], dtype=np.float64)
    bad = [i for i, v in enumerate(raw) if not math.isfinite(v)]
    if bad:
        raise VLLMBadResponse(
            "malformed",
            f"no finite logprob for candidates {bad} (letter tokens "
            f"{[letter_token_ids[i] for i in bad]}): is the server running with "
            "--logprobs-mode processed_logprobs and honouring allowed_token_ids?",
        )
    unique = np.array([found[t] for t in dict.fromkeys(letter_token_ids)])
    peak = unique.max()
    log_norm = peak + math.log(float(np.exp(unique - peak).sum()))
    return (raw - log_norm).astype(np.float32)
