"""Prometheus metrics of the services (names are a contract with the alert rules and dashboards).

Each app instance owns a registry (tests run several apps in one process); ``/metrics``
serves it together with the process-wide default registry, where the feature-store client and
the ranker backends register theirs. Labels are small closed sets: never a user or item id.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Summary,
    generate_latest,
)

import tandem
from services.common.fallbacks import Fallback
from services.common.variants import DEFAULT_VARIANT, OVERFLOW_LABEL

# Stage families get buckets that fit them: Redis and Faiss in µs-ms, the LLM in 10 ms-10 s.
FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
WIDE_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
RANKER_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)
HTTP_BUCKETS = WIDE_BUCKETS

STAGES = ("feature_user", "retrieval", "feature_items", "prompt", "ranker", "total")
FALLBACK_REASONS = tuple(reason.value for reason in Fallback)
EVENT_RESULTS = ("accepted", "duplicate", "rejected")
SHADOW_RESULTS = ("scored", "skipped", "timeout", "error")
UNMATCHED_ROUTE = "<unmatched>"


class ServiceMetrics:
    """HTTP metrics every service exports."""

    def __init__(self, service: str, registry: CollectorRegistry | None = None):
        self.service = service
        self.registry = registry if registry is not None else CollectorRegistry()
        self.http_requests = Counter(
            "tandem_http_requests",
            "HTTP requests by route template and status.",
            ["service", "route", "method", "status"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "tandem_http_request_duration_seconds",
            "HTTP request latency by route template (middleware to last byte).",
            ["service", "route"],
            buckets=HTTP_BUCKETS,
            registry=self.registry,
        )

    def observe_http(self, route: str, method: str, status: int, seconds: float) -> None:
        self.http_requests.labels(self.service, route, method, str(status)).inc()
        self.http_duration.labels(self.service, route).observe(seconds)

    def render(self) -> bytes:
        """This app's registry followed by the process-wide one (feature store, ranker)."""
        return generate_latest(self.registry) + generate_latest(REGISTRY)


class RetrievalMetrics(ServiceMetrics):
    def __init__(self, registry: CollectorRegistry | None = None):
        super().__init__("retrieval", registry)
        self.retrieval_duration = Histogram(
            "tandem_retrieval_duration_seconds",
            "Retrieval work per request: ONNX user encoding + Faiss search.",
            buckets=FAST_BUCKETS,
            registry=self.registry,
        )


class GatewayMetrics(ServiceMetrics):
    """The gateway's metrics. Per-request series carry the ranker ``variant`` that served it:
    only the configured names (fixed at start-up) or OVERFLOW_LABEL, so cardinality is bounded."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        variants: Sequence[str] = (DEFAULT_VARIANT,),
    ):
        super().__init__("gateway", registry)
        self.variants = frozenset(variants)
        self.stage_duration = Histogram(
            "tandem_stage_duration_seconds",
            "Per-stage latency of /recommend (stage in feature_user, retrieval, feature_items, "
            "prompt, ranker, total), by ranker variant.",
            ["stage", "variant"],
            buckets=WIDE_BUCKETS,
            registry=self.registry,
        )
        self.ranker_duration = Histogram(
            "tandem_ranker_duration_seconds",
            "Ranker stage latency as seen by the gateway, with buckets for LLM calls.",
            ["variant"],
            buckets=RANKER_BUCKETS,
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "tandem_fallbacks",
            "Requests answered with a fallback, by reason and ranker variant.",
            ["reason", "variant"],
            registry=self.registry,
        )
        self.shadow_requests = Counter(
            "tandem_shadow_requests",
            "Shadow scorings by variant and result (scored; skipped: concurrency limit full or "
            "the store down for the request; timeout: over the shadow's deadline; error).",
            ["variant", "result"],
            registry=self.registry,
        )
        self.shadow_duration = Histogram(
            "tandem_shadow_duration_seconds",
            "Latency of a shadow variant's scoring (prompt + ranker), off the response path.",
            ["variant"],
            buckets=RANKER_BUCKETS,
            registry=self.registry,
        )
        self.shadow_kendall_tau = Summary(  # a summary: histograms hide _sum below 0
            "tandem_shadow_kendall_tau",
            "Kendall tau-b between the served and the shadow ordering of the same candidates "
            "(1 = same order, -1 = reversed); mean = rate(_sum) / rate(_count).",
            ["variant"],
            registry=self.registry,
        )
        self.variant_share = Gauge(
            "tandem_variant_share",
            "Share of traffic each ranker variant serves in the active split (shadows 0).",
            ["variant"],
            registry=self.registry,
        )
        self.split_version = Gauge(
            "tandem_variant_split_version",
            "Version of the traffic split this gateway serves (0: the configured one, not read "
            "from Redis yet).",
            registry=self.registry,
        )
        self.split_errors = Counter(
            "tandem_variant_split_errors",
            "Polls of the stored split that failed (Redis unreachable) or were refused (a split "
            "naming a variant this gateway does not have); the last good split keeps serving.",
            registry=self.registry,
        )
        self.event_loop_lag = Histogram(
            "tandem_event_loop_lag_seconds",
            "How late the gateway's event loop runs a timer due now: CPU work or blocking calls "
            "on the loop show up here.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self.ranker_hit_position = Histogram(
            "tandem_ranker_hit_position",
            "0-based position in the final list of the retriever's top-1 candidate (0 = the "
            "ranker agreed with the retriever); only observed when the ranker ran.",
            buckets=tuple(float(i) for i in range(20)),
            registry=self.registry,
        )
        self.build_info = Gauge(
            "tandem_build_info",
            "Constant 1, labelled with the versions being served.",
            ["version", "retriever_run", "ranker_run", "backend"],
            registry=self.registry,
        )
        self.events = Counter(
            "tandem_events",
            "Events received by POST /events, by result (accepted, duplicate, rejected).",
            ["result"],
            registry=self.registry,
        )
        self.events_ingest_duration = Histogram(
            "tandem_events_ingest_duration_seconds",
            "POST /events work per batch: validation plus the one atomic Redis script.",
            buckets=WIDE_BUCKETS,
            registry=self.registry,
        )
        self.events_stream_length = Gauge(
            "tandem_events_stream_length",
            "Entries in the events stream after the last accepted batch (bounded by MAXLEN ~).",
            registry=self.registry,
        )
        for variant in self.variants:
            self.ranker_duration.labels(variant)
            for stage in STAGES:
                self.stage_duration.labels(stage, variant)
            for reason in FALLBACK_REASONS:
                self.fallbacks.labels(reason, variant)
        for result in EVENT_RESULTS:
            self.events.labels(result)

    def variant_label(self, name: str) -> str:
        """``name`` when configured, else OVERFLOW_LABEL: a label value from a closed set."""
        return name if name in self.variants else OVERFLOW_LABEL

    def set_build_info(self, retriever_run: str, ranker_run: str, backend: str) -> None:
        self.build_info.clear()
        self.build_info.labels(tandem.__version__, retriever_run, ranker_run, backend).set(1)

    def observe_stage(self, stage: str, seconds: float, variant: str = DEFAULT_VARIANT) -> None:
        label = self.variant_label(variant)
        self.stage_duration.labels(stage, label).observe(seconds)
        if stage == "ranker":
            self.ranker_duration.labels(label).observe(seconds)

    def fallback(self, reason: str, variant: str = DEFAULT_VARIANT) -> None:
        self.fallbacks.labels(reason, self.variant_label(variant)).inc()
