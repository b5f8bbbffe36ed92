"""Remote ranker backend: one ``/v1/completions`` call per prompt on a vLLM OpenAI server.

The wire format lives in ``wire``, the start-up checks in ``checks``, HTTP and connect retries
in ``transport``; this module holds what spans a whole ``score`` call:

- a deadline per call (retries and queueing included), raised as ``VLLMTimeout``;
- a circuit breaker (purgatory) that fails fast after ``breaker_failures`` consecutive
  unavailable calls and lets calls probe the server again after ``breaker_cooldown_s``: the
  first probe that fails opens it for another cool-down, the first that succeeds closes it.
  Only unavailability counts as a failure: a bad response (the server answered) or a call its
  caller cancelled (the gateway's stage deadline) says the server is not down;
- the adapter to score with: a fixed name, or (``model="auto"``) the newest served
  ``{prefix}-v{n}``, looked up every ``adapter_refresh_s`` and at once after a 404;
- prompt embeddings built and serialised in a small thread pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
from prometheus_client import REGISTRY, CollectorRegistry
from purgatory import AsyncCircuitBreakerFactory
from purgatory.domain.model import OpenedState

from ranker.adapters import versioned
from ranker.backends.base import RankerError, RankerUnavailable, RenderedPrompt
from ranker.backends.metrics import metrics_for
from ranker.backends.vllm.checks import (
    PROBE_TEXT,
    ServedModels,
    check_tokenizer,
    local_tokens,
    served_models,
    wait_healthy,
    warm_up,
)
from ranker.backends.vllm.config import AUTO, VLLMConfig
from ranker.backends.vllm.errors import (
    ERROR_TYPES,
    AdapterNotServed,
    ModelMismatchError,
    VLLMBadResponse,
    VLLMTimeout,
    VLLMUnavailable,
)
from ranker.backends.vllm.transport import Transport
from ranker.backends.vllm.wire import EmbeddingTable, completion_body, letter_scores

if TYPE_CHECKING:
    from purgatory.service._async.circuitbreaker import AsyncCircuitBreaker

log = logging.getLogger(__name__)

BACKEND = "vllm"


def _not_a_failure(exc: BaseException) -> bool:
    """For the breaker: only unavailability is a failure (see the module docstring)."""
    return not isinstance(exc, RankerUnavailable)


class VLLMBackend:
    """Async HTTP client of a vLLM server; safe to share between concurrent requests."""

    name = BACKEND

    def __init__(
        self,
        config: VLLMConfig,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        registry: CollectorRegistry = REGISTRY,
    ):
        """Cheap: files load and connections open in ``start``. ``transport`` is for tests."""
        if config.model_dir is None:
            raise ValueError("VLLMConfig.model_dir is required: the local base model directory")
        self.config = config
        self._http_transport = transport
        self._transport: Transport | None = None
        self._encoder: ThreadPoolExecutor | None = None
        self._breakers = AsyncCircuitBreakerFactory(
            default_threshold=config.breaker_failures,
            default_ttl=config.breaker_cooldown_s,
            exclude=[(BaseException, _not_a_failure)],
        )
        self._breaker: AsyncCircuitBreaker | None = None
        self._metrics = metrics_for(registry)
        self._metrics.declare_errors(BACKEND, ERROR_TYPES)
        self._table: EmbeddingTable | None = None
        self._base_model = ""
        self._model = "" if config.model == AUTO else config.model
        self._resolved_at = -math.inf
        self._resolve_lock = asyncio.Lock()
        self.max_model_len = 0
        self._started = False

    @property
    def model(self) -> str:
        """The served model (adapter) name scores come from, e.g. ``rec-v3``."""
        return self._model

    @property
    def breaker_state(self) -> str:
        """``closed``, ``open`` (failing fast) or ``half_open`` (the next calls probe)."""
        if self._breaker is None:
            return "closed"
        context = self._breaker.context
        if context.state == "closed":
            return "closed"
        opened_at = context.opened_at or 0.0
        if context.state == "opened" and time.time() <= opened_at + context.ttl:
            return "open"
        return "half_open"

    # lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the embedding table, check the server serves our model, warm it up."""
        if self._transport is None:
            self._transport = Transport(self.config, self._http_transport)
        if self._encoder is None:
            self._encoder = ThreadPoolExecutor(
                self.config.encode_threads, thread_name_prefix="vllm-encode"
            )
        if self._breaker is None:
            self._breaker = await self._breakers.get_breaker(BACKEND)
        model_dir = Path(self.config.model_dir)  # type: ignore[arg-type]
        if self._table is None:
            self._table = await asyncio.to_thread(EmbeddingTable.load, model_dir)
        probe = await asyncio.to_thread(local_tokens, model_dir, PROBE_TEXT)
        await wait_healthy(self._transport, self.config.startup_wait_s)
        try:
            async with asyncio.timeout(self.config.warmup_timeout_s):
                models = await self._served_models()
                await check_tokenizer(self._transport, models.base, probe, self._table, model_dir)
                self._resolve_model(models)
                await warm_up(
                    self._transport,
                    self._table,
                    probe,
                    base_model=models.base,
                    model=self._model,
                    logprobs=self.config.logprobs,
                    tolerance=self.config.embed_check_tolerance,
                    model_dir=model_dir,
                )
        except TimeoutError:
            raise VLLMTimeout(
                f"vLLM at {self.config.base_url} did not finish the start-up checks and warm-up "
                f"within {self.config.warmup_timeout_s:.0f}s"
            ) from None
        self._started = True
        log.info(
            "vLLM ranker ready: %s model=%s max_model_len=%d",
            self.config.base_url,
            self._model,
            self.max_model_len,
        )

    async def ready(self) -> bool:
        if not self._started or self._transport is None or self.breaker_state == "open":
            return False
        return await self._transport.health() is None

    async def close(self) -> None:
        self._started = False
        if self._transport is not None:
            await self._transport.close()
            self._transport = None
        if self._encoder is not None:
            self._encoder.shutdown(wait=False, cancel_futures=True)
            self._encoder = None

    # scoring -------------------------------------------------------------------------------

    async def score(
        self,
        prompts: Sequence[RenderedPrompt],
        *,
        request_id: str | None = None,
        deadline_s: float | None = None,
    ) -> list[np.ndarray]:
        """Per prompt, float32 log-probabilities over its letters, in candidate order."""
        if not prompts:
            return []
        try:
            if not self._started or self._breaker is None:
                raise VLLMUnavailable("connect", "the vLLM backend is not started (call start())")
            try:
                async with self._breaker:
                    started = time.perf_counter()  # calls that reach the server only
                    try:
                        return await self._score_within(prompts, request_id, deadline_s)
                    finally:
                        elapsed = time.perf_counter() - started
                        self._metrics.request_seconds.labels(BACKEND).observe(elapsed)
            except OpenedState as opened:
                # purgatory raises one instance per opening: drop the traceback each raise adds
                opened.with_traceback(None)
                raise VLLMUnavailable(
                    "circuit_open",
                    f"circuit open after {self.config.breaker_failures} consecutive failures; "
                    f"retrying {self.config.base_url} in <= {self.config.breaker_cooldown_s:.0f}s",
                ) from None
        except RankerError as exc:
            self._metrics.errors.labels(BACKEND, getattr(exc, "error_type", "malformed")).inc()
            raise

    async def _score_within(
        self, prompts: Sequence[RenderedPrompt], request_id: str | None, deadline_s: float | None
    ) -> list[np.ndarray]:
        budget = self.config.deadline_s if deadline_s is None else deadline_s
        try:
            async with asyncio.timeout(budget):
                try:
                    return await self._gather(prompts, await self._current_model(), request_id)
                except AdapterNotServed:
                    if self.config.model != AUTO:
                        raise
                    return await self._gather(prompts, await self.refresh_model(), request_id)
        except TimeoutError:
            raise VLLMTimeout(
                f"vLLM at {self.config.base_url} gave no answer within {budget:.2f}s"
            ) from None

    async def _gather(
        self, prompts: Sequence[RenderedPrompt], model: str, request_id: str | None
    ) -> list[np.ndarray]:
        """Score all prompts concurrently; the first typed error cancels the rest."""
        ids: list[str | None] = [request_id] * len(prompts)
        if request_id and len(prompts) > 1:  # vLLM aborts by id: keep them distinct
            ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._score_one(prompt, model, rid))
                    for prompt, rid in zip(prompts, ids, strict=True)
                ]
        except BaseExceptionGroup as group_error:
            typed = [e for e in group_error.exceptions if isinstance(e, RankerError)]
            raise (typed or list(group_error.exceptions))[0] from None
        return [task.result() for task in tasks]

    async def _score_one(
        self, prompt: RenderedPrompt, model: str, request_id: str | None
    ) -> np.ndarray:
        if not 1 <= prompt.num_candidates <= self.config.logprobs:
            raise ValueError(
                f"{prompt.num_candidates} candidates: one call scores 1..{self.config.logprobs}"
            )
        n_tokens = len(prompt.token_ids)
        if self.max_model_len and n_tokens >= self.max_model_len:
            raise VLLMBadResponse(
                "http_4xx",
                f"prompt has {n_tokens} tokens; the server's max_model_len is {self.max_model_len}",
            )
        self._metrics.prompt_tokens.labels(BACKEND).observe(n_tokens)
        body = await self._completion_body(prompt, model)
        headers = {"X-Request-ID": request_id} if request_id else None
        assert self._transport is not None
        answer = await self._transport.request("POST", "/v1/completions", body, headers)
        return letter_scores(answer, prompt.letter_token_ids)

    async def _completion_body(self, prompt: RenderedPrompt, model: str) -> dict[str, Any]:
        """The request body; a hybrid prompt's embeddings are built in the encoder threads."""
        assert self._table is not None
        if not prompt.is_hybrid:
            return completion_body(prompt, model, self.config.logprobs, self._table)
        return await asyncio.get_running_loop().run_in_executor(
            self._encoder, completion_body, prompt, model, self.config.logprobs, self._table
        )

    # adapters ------------------------------------------------------------------------------

    async def _current_model(self) -> str:
        if self.config.model != AUTO:
            return self._model
        if time.monotonic() - self._resolved_at >= self.config.adapter_refresh_s:
            async with self._resolve_lock:
                if time.monotonic() - self._resolved_at >= self.config.adapter_refresh_s:
                    self._resolve_model(await self._served_models())
        return self._model

    async def refresh_model(self) -> str:
        """Look up the newest adapter now (after a hot load or a rollback); returns its name."""
        async with self._resolve_lock:
            self._resolve_model(await self._served_models())
        return self._model

    async def _served_models(self) -> ServedModels:
        assert self._transport is not None
        models = await served_models(self._transport)
        self._base_model, self.max_model_len = models.base, models.max_model_len
        return models

    def _resolve_model(self, models: ServedModels) -> None:
        if self.config.model != AUTO:
            if self.config.model not in models.names:
                raise ModelMismatchError(
                    f"the server at {self.config.base_url} does not serve {self.config.model!r} "
                    f"(it serves {models.names}): load the adapter or fix the model setting"
                )
            self._model = self.config.model
        else:
            versions = versioned(models.names, self.config.adapter_prefix)
            chosen = versions[-1] if versions else models.base
            if not versions:
                log.warning(
                    "no %s-v{n} adapter on the server: scoring with the base model",
                    self.config.adapter_prefix,
                )
            if chosen != self._model and self._model:
                log.info("ranker adapter switched: %s -> %s", self._model, chosen)
            self._model = chosen
        self._resolved_at = time.monotonic()
