"""Prometheus metrics of feature reads: latency per stage, errors by type, hits and misses.

Labels are closed sets (``stage`` in user/items, ``error_type`` in ERROR_TYPES, ``result`` in
hit/miss): never user or item ids. Buckets span 50 µs .. 1 s, where Redis latencies live.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tandem.metric_sets import per_registry

STAGES = ("user", "items")
ERROR_TYPES = ("timeout", "connection", "corrupt", "redis")
BUCKETS = (
    50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1.0,
)  # fmt: skip


@dataclass(frozen=True)
class FeatureStoreMetrics:
    read_seconds: Histogram
    errors: Counter
    lookups: Counter
    item_cache: Counter
    version: Gauge

    def observe_error(self, stage: str, error_type: str, count: int = 1) -> None:
        self.errors.labels(stage=stage, error_type=error_type).inc(count)

    def observe_lookups(self, stage: str, hits: int, misses: int) -> None:
        if hits:
            self.lookups.labels(stage=stage, result="hit").inc(hits)
        if misses:
            self.lookups.labels(stage=stage, result="miss").inc(misses)

    def observe_item_cache(self, hits: int, misses: int) -> None:
        if hits:
            self.item_cache.labels(result="hit").inc(hits)
        if misses:
            self.item_cache.labels(result="miss").inc(misses)


@per_registry
def metrics_for(registry: CollectorRegistry) -> FeatureStoreMetrics:
    """The metric set registered in ``registry`` (created once; clients share it)."""
    metrics = FeatureStoreMetrics(
        read_seconds=Histogram(
            "tandem_feature_store_read_seconds",
            "Feature store read latency per request stage (one round trip each).",
            ["stage"],
            buckets=BUCKETS,
            registry=registry,
        ),
        errors=Counter(
            "tandem_feature_store_errors_total",
            "Feature store read errors by stage and type (corrupt values are counted per value).",
            ["stage", "error_type"],
            registry=registry,
        ),
        lookups=Counter(
            "tandem_feature_store_lookups_total",
            "Records looked up, by stage and result (hit or miss).",
            ["stage", "result"],
            registry=registry,
        ),
        item_cache=Counter(
            "tandem_feature_store_item_cache_lookups_total",
            "Item records looked up in the in-process item cache, by result (a miss is read "
            "from Redis).",
            ["result"],
            registry=registry,
        ),
        version=Gauge(
            "tandem_feature_store_version",
            "Feature version the client last resolved from the alias (0 = none published).",
            registry=registry,
        ),
    )
    for stage in STAGES:
        metrics.read_seconds.labels(stage=stage)
        for error_type in ERROR_TYPES:
            metrics.errors.labels(stage=stage, error_type=error_type)
        for result in ("hit", "miss"):
            metrics.lookups.labels(stage=stage, result=result)
    for result in ("hit", "miss"):
        metrics.item_cache.labels(result=result)
    return metrics
