"""How the vLLM client reaches and uses its server: one frozen config, defaults commented."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

AUTO = "auto"  # model setting: the newest loaded ``{adapter_prefix}-v{n}`` adapter


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
    breaker_cooldown_s: float = 10.0  # open circuit: fail fast this long, then let calls probe
    adapter_refresh_s: float = 30.0  # "auto": how often to look for a newer adapter
    startup_wait_s: float = 0.0  # start(): how long to wait for the server's /health
    warmup_timeout_s: float = 120.0  # start(): checks + warm-up (a cold CPU server's first
    #   request took ~20 s here)
    logprobs: int = 20  # top logprobs asked for: must cover every letter (vLLM's max is 20)
    embed_check_tolerance: float = 0.05  # start(): max |logprob| gap, token ids vs embeddings
    encode_threads: int = 2  # threads that build and serialise prompt embeddings off the loop
