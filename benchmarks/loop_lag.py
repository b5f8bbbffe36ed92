"""Event-loop lag of a running gateway, from its own ``tandem_event_loop_lag_seconds``.

Scrape the histogram before and after a load level; the difference holds that level's
observations. Quantiles are interpolated inside buckets as Prometheus' ``histogram_quantile``
does; the share at or under a bound that is a bucket edge is exact.
"""

from __future__ import annotations

import httpx

LAG_METRIC = "tandem_event_loop_lag_seconds"


def lag_buckets(url: str) -> dict[float, float] | None:
    """Cumulative counts of the gateway's loop-lag histogram by upper bound (s); None when
    the gateway has no such histogram (a baseline revision from before it existed)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == LAG_METRIC:
            return {
                float(sample.labels["le"]): sample.value
                for sample in family.samples
                if sample.name.endswith("_bucket")
            }
    return None


def lag_summary(
    before: dict[float, float] | None, after: dict[float, float] | None, bound_ms: float
) -> dict:
    """Lag p50 / p99 (ms) of the observations between two scrapes, their count, and the share
    at or under ``bound_ms`` (None where there were none)."""
    empty = {"p50": None, "p99": None, "count": 0, "share_le_bound": None}
    if before is None or after is None:
        return empty
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1]
    if total <= 0:
        return empty

    def quantile(q: float) -> float:
        rank = q * total
        lower, below = 0.0, 0.0
        for bound, cumulative in zip(bounds, counts, strict=True):
            if cumulative >= rank:
                if bound == float("inf"):
                    return lower * 1000  # past the last finite bucket: its edge, as Prometheus
                inside = cumulative - below
                share = (rank - below) / inside if inside else 1.0
                return (lower + (bound - lower) * share) * 1000
            lower, below = bound, cumulative
        return lower * 1000

    at_bound = after.get(bound_ms / 1000, 0.0) - before.get(bound_ms / 1000, 0.0)
    return {
        "p50": round(quantile(0.50), 3),
        "p99": round(quantile(0.99), 3),
        "count": int(total),
        "share_le_bound": round(at_bound / total, 4),
    }
