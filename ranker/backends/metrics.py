"""Prometheus metrics of the ranker backends, registered in the registry the caller passes.

Names are a contract with the alert rules and the dashboard; labels are closed sets
(``backend``, ``error_type``). ``metrics_for`` creates the set once per registry, so several
backends (or several clients of one backend) in a process share one set of collectors, as the
feature-store metrics do. Buckets fit LLM calls: 10 ms .. 10 s.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

from tandem.metric_sets import per_registry

RANKER_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 4096)


@dataclass(frozen=True)
class RankerMetrics:
    request_seconds: Histogram
    errors: Counter
    prompt_tokens: Histogram

    def declare_errors(self, backend: str, error_types: Iterable[str]) -> None:
        """Export every error series as 0 from the start, so rates and alerts work."""
        for error_type in error_types:
            self.errors.labels(backend, error_type)


@per_registry
def metrics_for(registry: CollectorRegistry) -> RankerMetrics:
    """The ranker metric set registered in ``registry`` (created once; backends share it)."""
    return RankerMetrics(
        request_seconds=Histogram(
            "tandem_ranker_request_seconds",
            "Ranker backend latency of one score() call (a batch of prompts).",
            ["backend"],
            buckets=RANKER_BUCKETS,
            registry=registry,
        ),
        errors=Counter(
            "tandem_ranker_errors_total",
            "Ranker backend failures by type (a closed set).",
            ["backend", "error_type"],
            registry=registry,
        ),
        prompt_tokens=Histogram(
            "tandem_ranker_prompt_tokens",
            "Prompt length in tokens, per scored prompt.",
            ["backend"],
            buckets=TOKEN_BUCKETS,
            registry=registry,
        ),
    )
