"""Greedy text generation for enrichment jobs: in-process transformers or a vLLM server.

Both backends take chat conversations (lists of ``{"role", "content"}``) and return the
generated text per conversation, decoded greedily (deterministic) with a token cap. The
in-process backend batches with left padding; the HTTP backend sends concurrent requests to
an OpenAI-compatible server (vLLM batches them itself).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

Conversation = Sequence[dict[str, str]]


class GenerationError(RuntimeError):
    """The LLM could not produce text (server unreachable, bad answer, model not loadable)."""


class Generator(Protocol):
    """What preference and caption jobs need from an LLM."""

    name: str
    completion_tokens: int  # tokens generated so far (for throughput reports)

    def generate(self, conversations: Sequence[Conversation]) -> list[str]: ...

    def special_tokens(self) -> tuple[str, ...]:
        """The tokenizer's special tokens, escaped by the sanitiser (empty when unknown)."""
        ...


def render_plain(conversation: Conversation) -> str:
    """A template-free rendering for models without a chat template."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in conversation]
    return "\n".join(lines) + "\nAssistant:"


class TransformersGenerator:
    """A local causal LM (any HF checkpoint folder), batched greedy decoding on CPU."""

    name = "transformers"

    def __init__(
        self,
        model_dir: Path,
        max_new_tokens: int = 96,
        batch_size: int = 8,
        dtype: str = "float32",
        threads: int | None = None,
    ):
        self.model_dir = Path(model_dir)
        self.threads = threads
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.dtype = dtype
        self.completion_tokens = 0
        self._model = None
        self._tokenizer = None

    def load(self) -> TransformersGenerator:
        if self._model is not None:
            return self
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoTokenizer

        from ranker.llm import LLMError, load_model

        if self.threads:
            torch.set_num_threads(self.threads)

        try:
            model = load_model(self.model_dir)
            tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        except (LLMError, OSError, ValueError) as exc:
            raise GenerationError(
                f"cannot load the LLM from {self.model_dir} ({exc}): run `tandem llm prepare` "
                "or pass --llm DIR / --llm-url URL"
            ) from exc
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = model.to(getattr(torch, self.dtype))
        self._tokenizer, self._model = tokenizer, model.eval()
        return self

    def special_tokens(self) -> tuple[str, ...]:
        self.load()
        return tuple(self._tokenizer.all_special_tokens)

    def render(self, conversation: Conversation) -> str:
        self.load()
        if self._tokenizer.chat_template:
            return self._tokenizer.apply_chat_template(
                list(conversation), tokenize=False, add_generation_prompt=True
            )
        return render_plain(conversation)

    def generate(self, conversations: Sequence[Conversation]) -> list[str]:
        import torch

        self.load()
        prompts = [self.render(c) for c in conversations]
        # similar lengths share a batch, so little compute goes to padding
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        outputs: list[str] = [""] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            batch = self._tokenizer(
                [prompts[i] for i in rows],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            )
            with torch.inference_mode():
                generated = self._model.generate(
                    **batch,
                    do_sample=False,
                    max_new_tokens=self.max_new_tokens,
                    pad_token_id=self._tokenizer.pad_token_id,
                )
            new = generated[:, batch["input_ids"].shape[1] :]
            self.completion_tokens += int((new != self._tokenizer.pad_token_id).sum())
            texts = self._tokenizer.batch_decode(new, skip_special_tokens=True)
            for row, text in zip(rows, texts, strict=True):
                outputs[row] = text
        return outputs


class OpenAIGenerator:
    """An OpenAI-compatible server (vLLM): ``/v1/chat/completions`` or ``/v1/completions``."""

    name = "openai-http"

    def __init__(
        self,
        url: str,
        model: str | None = None,
        api: str = "chat",
        max_new_tokens: int = 96,
        concurrency: int = 8,
        timeout_s: float = 300.0,
        retries: int = 2,
    ):
        import httpx

        if api not in ("chat", "completions"):
            raise ValueError(f"api must be 'chat' or 'completions', got {api!r}")
        self.url = url.rstrip("/")
        self.api = api
        self.max_new_tokens = max_new_tokens
        self.concurrency = concurrency
        self.retries = retries
        self.completion_tokens = 0
        self._client = httpx.Client(base_url=self.url, timeout=timeout_s)
        self.model = model or self._first_model()

    def _first_model(self) -> str:
        import httpx

        try:
            response = self._client.get("/v1/models")
            response.raise_for_status()
            return response.json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
            raise GenerationError(
                f"cannot list models at {self.url}/v1/models ({exc}): is the vLLM server up?"
            ) from exc

    def special_tokens(self) -> tuple[str, ...]:
        return ()

    def _request(self, conversation: Conversation) -> str:
        import httpx

        body: dict = {
            "model": self.model,
            "max_tokens": self.max_new_tokens,
            "temperature": 0.0,
            "seed": 0,
        }
        if self.api == "chat":
            path, body["messages"] = "/v1/chat/completions", list(conversation)
        else:
            path, body["prompt"] = "/v1/completions", render_plain(conversation)
        for attempt in range(self.retries + 1):
            try:
                response = self._client.post(path, json=body)
                if response.status_code < 500:
                    response.raise_for_status()
                    data = response.json()
                    choice = data["choices"][0]
                    self.completion_tokens += int(data.get("usage", {}).get("completion_tokens", 0))
                    return choice["message"]["content"] if self.api == "chat" else choice["text"]
                error: Exception = GenerationError(f"{path} answered {response.status_code}")
            except httpx.TransportError as exc:
                error = exc
            except (httpx.HTTPStatusError, KeyError, IndexError, ValueError) as exc:
                raise GenerationError(f"{self.url}{path} gave an unusable answer: {exc}") from exc
            if attempt < self.retries:
                time.sleep(0.5 * 2**attempt)
        raise GenerationError(
            f"{self.url}{path} failed after {self.retries + 1} attempts: {error}"
        ) from error

    def generate(self, conversations: Sequence[Conversation]) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._request, conversations))

    def close(self) -> None:
        self._client.close()


@dataclass(frozen=True)
class GeneratorSpec:
    """How to build a generator; plain data, so Ray workers can build their own copy."""

    model_dir: str | None = None  # a local HF causal-LM folder (in-process generation)
    url: str | None = None  # an OpenAI-compatible server; wins over model_dir when set
    api: str = "chat"  # "chat" or "completions" (server only)
    served_model: str | None = None  # the server's model name; default: its first model
    max_new_tokens: int = 96  # cap on generated tokens per call
    batch_size: int = 8  # prompts per in-process forward
    dtype: str = "float32"  # in-process weights: float32 or bfloat16
    concurrency: int = 8  # parallel requests to the server
    threads: int | None = None  # in-process torch threads (None: torch's default, all cores)

    def build(self) -> Generator:
        if self.url:
            return OpenAIGenerator(
                self.url,
                model=self.served_model,
                api=self.api,
                max_new_tokens=self.max_new_tokens,
                concurrency=self.concurrency,
            )
        if not self.model_dir:
            raise GenerationError(
                "no LLM given: pass a model folder (--llm) or a server (--llm-url)"
            )
        return TransformersGenerator(
            Path(self.model_dir),
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            dtype=self.dtype,
            threads=self.threads,
        ).load()
