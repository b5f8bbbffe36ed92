"""Remote ranker backend: one ``/v1/completions`` call per prompt on a vLLM OpenAI server.

Each prompt is scored in one forward pass: ``max_tokens=1``, ``temperature=0``, the sampler
restricted to the prompt's letter tokens (``allowed_token_ids``) and their log-probabilities
returned (``logprobs=20``, ``return_tokens_as_token_ids``). The server runs with
``--logprobs-mode processed_logprobs``, so those are already the log-softmax over the letters; the
client renormalises over the letters anyway, so a server in raw mode yields the same scores.

A letter missing from the answer is a ``RankerBadResponse``, not a floor score: with at most 20
allowed tokens and ``logprobs=20`` every letter is always returned, so a missing one means the
server broke the contract (wrong logprobs mode, allowed ids ignored) and a guessed score would
silently corrupt the ranking; the gateway falls back to retriever order instead.

Text-only prompts go as token ids. Hybrid prompts go as ``prompt_embeds`` (base64 of
``torch.save(tensor[n_tokens, hidden])``, vLLM's wire format): rows of the base model's input
embedding table, held once here in bf16, with the soft rows put in. At start-up the client checks
that the server tokenizes like the local model and that embeddings and token ids score the same
(so the local table is the server's), and warms the server up with a >= 15-token request.

Failure handling: a deadline per ``score`` call (retries and queueing included), a semaphore on
requests in flight, bounded retries on connection errors only (nothing was sent), and a circuit
breaker that fails fast after repeated unavailability and lets one probe through after a cool-down.
Transport failures, timeouts and 5xx are ``RankerUnavailable``; 4xx and malformed bodies are
``RankerBadResponse``. Only unavailability counts towards the breaker.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client import REGISTRY, Counter, Histogram

from ranker.backends.base import (
    RankerBadResponse,
    RankerError,
    RankerUnavailable,
    RenderedPrompt,
)

log = logging.getLogger(__name__)

BACKEND = "vllm"
AUTO = "auto"  # model setting: the newest loaded ``{adapter_prefix}-v{n}`` adapter
ERROR_TYPES = (
    "connect",
    "timeout",
    "http_5xx",
    "http_4xx",
    "malformed",
    "circuit_open",
    "mismatch",
)
# Common prompt words (merged differently by different vocabularies), letters, digits, unicode.
PROBE_TEXT = (
    "You are a movie recommender system. The user has watched the following movies: "
    "Toy Story (1995). Candidates: A. B. C. D. E. F. G. H. I. J. K. L. M. N. O. P. Q. R. "
    "S. T. Answer with the index letter. 0123456789 Ünïcödé ok."
)
WARMUP_TOKENS = 32  # RECIPES: a very short FIRST request can kill the CPU worker (SIGILL)


@dataclass(frozen=True)
class VLLMConfig:
    """How to reach and use one vLLM server (or a load-balanced group of identical ones)."""

    base_url: str = "http://127.0.0.1:8011"  # the vLLM OpenAI server
    model_dir: Path | None = None  # local base model: tokenizer + embedding table (required)
    model: str = AUTO  # served name to score with: "auto", an adapter name, or the base name
    adapter_prefix: str = "rec"  # adapters are served as "{prefix}-v{n}"
    deadline_s: float = 5.0  # wall-clock budget of one score() call, retries included
    connect_timeout_s: float = 1.0  # TCP connect budget of one attempt
    max_concurrency: int = 8  # requests in flight from this client
    connect_retries: int = 2  # extra attempts after a connection error (nothing was sent)
    retry_backoff_s: float = 0.05  # first retry delay, doubled each time
    breaker_failures: int = 5  # consecutive unavailable calls that open the circuit
    breaker_cooldown_s: float = 10.0  # open circuit: fail fast this long, then let one probe in
    adapter_refresh_s: float = 30.0  # "auto": how often to look for a newer adapter
    startup_wait_s: float = 0.0  # start(): how long to wait for the server's /health
    warmup_timeout_s: float = 120.0  # start(): checks + warm-up (a cold CPU server's first
    #   request took ~20 s here)
    logprobs: int = 20  # top logprobs asked for: must cover every letter (vLLM's max is 20)
    embed_check_tolerance: float = 0.05  # start(): max |logprob| gap, token ids vs embeddings


# --- metrics -------------------------------------------------------------------------------

_RANKER_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)
_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 4096)


def _registered(name: str, factory):
    """The collector already registered as ``name`` (another backend may own it), else a new one."""
    existing = REGISTRY._names_to_collectors.get(name)
    return existing if existing is not None else factory()


REQUEST_SECONDS = _registered(
    "tandem_ranker_request_seconds",
    lambda: Histogram(
        "tandem_ranker_request_seconds",
        "Ranker backend latency of one score() call (a batch of prompts).",
        ["backend"],
        buckets=_RANKER_BUCKETS,
    ),
)
ERRORS = _registered(
    "tandem_ranker_errors_total",
    lambda: Counter(
        "tandem_ranker_errors_total",
        "Ranker backend failures by type (a closed set).",
        ["backend", "error_type"],
    ),
)
PROMPT_TOKENS = _registered(
    "tandem_ranker_prompt_tokens",
    lambda: Histogram(
        "tandem_ranker_prompt_tokens",
        "Prompt length in tokens, per scored prompt.",
        ["backend"],
        buckets=_TOKEN_BUCKETS,
    ),
)


for _error_type in ERROR_TYPES:  # exported as 0 from the start, so rates and alerts work
    ERRORS.labels(BACKEND, _error_type)


class VLLMUnavailable(RankerUnavailable):
    """Unavailable, with the metric label saying why."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


class VLLMBadResponse(RankerBadResponse):
    """Bad response, with the metric label saying why."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


class AdapterNotServed(VLLMBadResponse):
    """404 from /v1/completions: the adapter was unloaded (a rollback) or never loaded."""


class ModelMismatchError(VLLMUnavailable):
    """The server's model or tokenizer is not the local one: prompts would be misread."""

    def __init__(self, message: str):
        super().__init__("mismatch", message)


# --- wire format ---------------------------------------------------------------------------


class EmbeddingTable:
    """The base model's input embedding table in bf16, read alone from the safetensors files."""

    KEY_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")

    def __init__(self, weight):
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

    def prompt_rows(self, prompt: RenderedPrompt):
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


def encode_prompt_embeds(tensor) -> str:
    """vLLM's ``prompt_embeds`` wire format: base64 of ``torch.save(tensor)``."""
    import torch

    buffer = io.BytesIO()
    torch.save(tensor.contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


_TOKEN_KEY = re.compile(r"^token_id:(-?\d+)$")


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


# --- circuit breaker -----------------------------------------------------------------------


class CircuitBreaker:
    """Closed -> open after N consecutive failures -> one half-open probe after a cool-down."""

    def __init__(self, failures: int, cooldown_s: float, clock=time.monotonic):
        self.failures = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._consecutive = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        if self._probing or self._clock() - self._opened_at >= self.cooldown_s:
            return "half_open"
        return "open"

    def allow(self) -> bool:
        """May a call go through now? In half-open state only one probe at a time does."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        self._consecutive = 0
        self._opened_at = None
        self._probing = False

    def failure(self) -> None:
        self._consecutive += 1
        if self._probing or self._consecutive >= self.failures:
            self._opened_at = self._clock()
        self._probing = False

    def release(self) -> None:
        """A call that neither proved nor disproved the server (e.g. a 4xx) ends its probe."""
        self._probing = False


# --- the backend ---------------------------------------------------------------------------


class VLLMBackend:
    """Async HTTP client of a vLLM server; safe to share between concurrent requests."""

    name = BACKEND

    def __init__(self, config: VLLMConfig, transport: httpx.AsyncBaseTransport | None = None):
        if config.model_dir is None:
            raise ValueError("VLLMConfig.model_dir is required: the local base model directory")
        self.config = config
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._semaphore = asyncio.Semaphore(config.max_concurrency)
        self._breaker = CircuitBreaker(config.breaker_failures, config.breaker_cooldown_s)
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
        return self._breaker.state

    # lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the embedding table, check the server serves our model, warm it up."""
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.config.base_url,
                # Reads are bounded by each call's asyncio deadline, not by httpx.
                timeout=httpx.Timeout(None, connect=self.config.connect_timeout_s),
                limits=httpx.Limits(
                    max_connections=self.config.max_concurrency,
                    max_keepalive_connections=self.config.max_concurrency,
                ),
                transport=self._transport,
                trust_env=False,
            )
        model_dir = Path(self.config.model_dir)  # type: ignore[arg-type]
        if self._table is None:
            self._table = await asyncio.to_thread(EmbeddingTable.load, model_dir)
        local_probe = await asyncio.to_thread(_local_tokens, model_dir, PROBE_TEXT)
        await self._wait_healthy(self.config.startup_wait_s)
        try:
            async with asyncio.timeout(self.config.warmup_timeout_s):
                models = await self._models()
                await self._check_tokenizer(local_probe)
                await self._resolve_model(models)
                await self._warm_up(local_probe)
        except TimeoutError:
            raise VLLMUnavailable(
                "timeout",
                f"vLLM at {self.config.base_url} did not finish the start-up checks and warm-up "
                f"within {self.config.warmup_timeout_s:.0f}s",
            ) from None
        self._started = True
        log.info(
            "vLLM ranker ready: %s model=%s max_model_len=%d",
            self.config.base_url,
            self._model,
            self.max_model_len,
        )

    async def ready(self) -> bool:
        if not self._started or self._client is None or self._breaker.state == "open":
            return False
        try:
            response = await self._client.get("/health", timeout=self.config.connect_timeout_s)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def close(self) -> None:
        self._started = False
        if self._client is not None:
            await self._client.aclose()
            self._client = None

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
            if not self._started:
                raise VLLMUnavailable("connect", "the vLLM backend is not started (call start())")
            if not self._breaker.allow():
                raise VLLMUnavailable(
                    "circuit_open",
                    f"circuit open after {self.config.breaker_failures} consecutive failures; "
                    f"retrying {self.config.base_url} in <= {self.config.breaker_cooldown_s:.0f}s",
                )
            started = time.perf_counter()  # calls that reach the server only
            try:
                return await self._score_guarded(prompts, request_id, deadline_s)
            finally:
                REQUEST_SECONDS.labels(BACKEND).observe(time.perf_counter() - started)
        except RankerError as exc:
            ERRORS.labels(BACKEND, getattr(exc, "error_type", "malformed")).inc()
            raise

    async def _score_guarded(self, prompts, request_id, deadline_s) -> list[np.ndarray]:
        budget = self.config.deadline_s if deadline_s is None else deadline_s
        try:
            async with asyncio.timeout(budget):
                try:
                    result = await self._gather(prompts, await self._current_model(), request_id)
                except AdapterNotServed:
                    if self.config.model != AUTO:
                        raise
                    result = await self._gather(prompts, await self.refresh_model(), request_id)
        except TimeoutError:
            self._breaker.failure()
            raise VLLMUnavailable(
                "timeout", f"vLLM at {self.config.base_url} gave no answer within {budget:.2f}s"
            ) from None
        except RankerUnavailable:
            self._breaker.failure()
            raise
        except BaseException:
            self._breaker.release()
            raise
        self._breaker.success()
        return result

    async def _gather(self, prompts, model: str, request_id: str | None) -> list[np.ndarray]:
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
        PROMPT_TOKENS.labels(BACKEND).observe(n_tokens)
        body = self._completion_body(prompt, model)
        headers = {"X-Request-ID": request_id} if request_id else None
        answer = await self._post("/v1/completions", body, headers)
        return letter_scores(answer, prompt.letter_token_ids)

    def _completion_body(self, prompt: RenderedPrompt, model: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": self.config.logprobs,
            "allowed_token_ids": list(dict.fromkeys(prompt.letter_token_ids)),
            "return_tokens_as_token_ids": True,
        }
        if prompt.is_hybrid:
            assert self._table is not None
            body["prompt_embeds"] = encode_prompt_embeds(self._table.prompt_rows(prompt))
        else:
            body["prompt"] = list(prompt.token_ids)
        return body

    # adapters ------------------------------------------------------------------------------

    async def _current_model(self) -> str:
        if self.config.model != AUTO:
            return self._model
        if time.monotonic() - self._resolved_at >= self.config.adapter_refresh_s:
            async with self._resolve_lock:
                if time.monotonic() - self._resolved_at >= self.config.adapter_refresh_s:
                    await self._resolve_model(await self._models())
        return self._model

    async def refresh_model(self) -> str:
        """Look up the newest adapter now (after a hot load or a rollback); returns its name."""
        async with self._resolve_lock:
            await self._resolve_model(await self._models())
        return self._model

    async def _resolve_model(self, models: list[dict[str, Any]]) -> None:
        names = [str(m.get("id")) for m in models]
        if self.config.model != AUTO:
            if self.config.model not in names:
                raise ModelMismatchError(
                    f"the server at {self.config.base_url} does not serve {self.config.model!r} "
                    f"(it serves {names}): load the adapter or fix the model setting"
                )
            self._model = self.config.model
        else:
            pattern = re.compile(rf"^{re.escape(self.config.adapter_prefix)}-v(\d+)$")
            versions = [(int(m.group(1)), n) for n in names if (m := pattern.match(n))]
            if versions:
                chosen = max(versions)[1]
            else:
                chosen = self._base_model
                log.warning(
                    "no %s-v{n} adapter on the server: scoring with the base model",
                    self.config.adapter_prefix,
                )
            if chosen != self._model and self._model:
                log.info("ranker adapter switched: %s -> %s", self._model, chosen)
            self._model = chosen
        self._resolved_at = time.monotonic()

    # server checks -------------------------------------------------------------------------

    async def _wait_healthy(self, wait_s: float) -> None:
        assert self._client is not None
        give_up = time.monotonic() + wait_s
        while True:
            try:
                response = await self._client.get("/health", timeout=self.config.connect_timeout_s)
                if response.status_code == 200:
                    return
                problem = f"/health answered {response.status_code}"
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= give_up:
                raise VLLMUnavailable(
                    "connect", f"vLLM at {self.config.base_url} is not healthy ({problem})"
                )
            await asyncio.sleep(0.5)

    async def _models(self) -> list[dict[str, Any]]:
        answer = await self._request("GET", "/v1/models", None, None)
        try:
            models = list(answer["data"])
            base = next(m for m in models if not m.get("parent"))
            self._base_model = str(base["id"])
            self.max_model_len = int(base.get("max_model_len") or 0)
        except (KeyError, TypeError, ValueError, StopIteration):
            raise VLLMBadResponse("malformed", f"/v1/models answered {str(answer)[:200]}") from None
        return models

    async def _check_tokenizer(self, local_probe: list[int]) -> None:
        answer = await self._request(
            "POST",
            "/tokenize",
            {"model": self._base_model, "prompt": PROBE_TEXT, "add_special_tokens": False},
            None,
        )
        remote = answer.get("tokens") if isinstance(answer, dict) else None
        if remote != local_probe:
            raise ModelMismatchError(
                f"the server's tokenizer differs from {self.config.model_dir}: the probe "
                f"tokenizes to {remote} there and {local_probe} here. Point the client at the "
                "model directory the server was started from."
            )
        assert self._table is not None
        if max(local_probe) >= self._table.vocab_size:
            raise ModelMismatchError("the local embedding table is smaller than the vocabulary")

    async def _warm_up(self, probe: list[int]) -> None:
        """A >= 15-token first request; token ids and embeddings must score alike."""
        ids = (probe * (WARMUP_TOKENS // len(probe) + 1))[:WARMUP_TOKENS]
        letters = tuple(dict.fromkeys(probe))[:8]
        text = RenderedPrompt(token_ids=tuple(ids), letter_token_ids=letters)
        assert self._table is not None
        soft = self._table.prompt_rows(text).float().numpy()[:1]
        hybrid = RenderedPrompt(
            token_ids=tuple(ids), letter_token_ids=letters, soft_positions=(0,), soft_vectors=soft
        )
        by_ids = letter_scores(
            await self._post("/v1/completions", self._completion_body(text, self._base_model)),
            letters,
        )
        by_embeds = letter_scores(
            await self._post("/v1/completions", self._completion_body(hybrid, self._base_model)),
            letters,
        )
        gap = float(np.max(np.abs(by_ids - by_embeds)))
        if gap > self.config.embed_check_tolerance:
            raise ModelMismatchError(
                f"prompt embeddings from {self.config.model_dir} score {gap:.3f} nats away from "
                "the same tokens sent as ids: the server runs other weights than the local copy"
            )
        if self._model != self._base_model:
            await self._post("/v1/completions", self._completion_body(hybrid, self._model))

    # transport -----------------------------------------------------------------------------

    async def _post(self, path: str, body: dict[str, Any], headers=None) -> Any:
        return await self._request("POST", path, body, headers)

    async def _request(self, method: str, path: str, body, headers) -> Any:
        """One HTTP exchange with bounded connect retries, mapped onto the typed errors."""
        assert self._client is not None
        delay = self.config.retry_backoff_s
        attempt = 0
        async with self._semaphore:
            while True:
                try:
                    response = await self._client.request(method, path, json=body, headers=headers)
                    break
                except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                    if attempt >= self.config.connect_retries:
                        raise VLLMUnavailable(
                            "connect", f"cannot connect to vLLM at {self.config.base_url}: {exc}"
                        ) from None
                    attempt += 1
                    await asyncio.sleep(delay)
                    delay *= 2
                except httpx.TimeoutException as exc:
                    raise VLLMUnavailable(
                        "timeout", f"vLLM at {self.config.base_url} timed out: {exc!r}"
                    ) from None
                except httpx.HTTPError as exc:
                    raise VLLMUnavailable(
                        "connect", f"vLLM at {self.config.base_url} dropped the request: {exc!r}"
                    ) from None
        return _decode(response, path)


def _decode(response: httpx.Response, path: str) -> Any:
    if response.status_code == 404 and path == "/v1/completions":
        raise AdapterNotServed("http_4xx", f"vLLM {path}: {_error_text(response)}")
    if response.status_code >= 500:
        raise VLLMUnavailable(
            "http_5xx", f"vLLM {path} answered {response.status_code}: {_error_text(response)}"
        )
    if response.status_code >= 400:
        raise VLLMBadResponse(
            "http_4xx", f"vLLM {path} answered {response.status_code}: {_error_text(response)}"
        )
    try:
        return response.json()
    except ValueError:
        raise VLLMBadResponse(
            "malformed", f"vLLM {path} answered non-JSON: {response.text[:200]!r}"
        ) from None


def _error_text(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return response.text[:300]


def _local_tokens(model_dir: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return list(tokenizer.encode(text, add_special_tokens=False))
