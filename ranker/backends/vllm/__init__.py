"""The vLLM ranker backend: an async client of a vLLM OpenAI server that scores letter prompts.

Modules by concern: ``config`` (VLLMConfig), ``errors`` (typed errors with metric labels),
``wire`` (completion body, ``prompt_embeds`` serialisation, reading letter scores), ``checks``
(start-up: tokenizer and embedding checks, warm-up), ``transport`` (HTTP, connect retries) and
``backend`` (deadline, circuit breaker, adapter choice). Callers import from here.
"""

from ranker.backends.vllm.backend import BACKEND, VLLMBackend
from ranker.backends.vllm.checks import PROBE_TEXT
from ranker.backends.vllm.config import AUTO, VLLMConfig
from ranker.backends.vllm.errors import (
    ERROR_TYPES,
    AdapterNotServed,
    ModelMismatchError,
    VLLMBadResponse,
    VLLMTimeout,
    VLLMUnavailable,
)
from ranker.backends.vllm.wire import EmbeddingTable, encode_prompt_embeds, letter_scores

__all__ = [
    "AUTO",
    "BACKEND",
    "ERROR_TYPES",
    "PROBE_TEXT",
    "AdapterNotServed",
    "EmbeddingTable",
    "ModelMismatchError",
    "VLLMBackend",
    "VLLMBadResponse",
    "VLLMConfig",
    "VLLMTimeout",
    "VLLMUnavailable",
    "encode_prompt_embeds",
    "letter_scores",
]
