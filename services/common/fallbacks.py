"""Why an answer took a fallback: one closed set shared by the schema, the metrics and the code."""

from __future__ import annotations

from enum import StrEnum


class Fallback(StrEnum):
    RANKER_UNAVAILABLE = "ranker_unavailable"
    RANKER_TIMEOUT = "ranker_timeout"
    FEATURE_STORE_UNAVAILABLE = "feature_store_unavailable"
    FEATURE_STORE_STALE = "feature_store_stale"  # the store failed; the near-cache answered
    RETRIEVAL_UNAVAILABLE = "retrieval_unavailable"
    COLD_START = "cold_start"
    DEADLINE_EXCEEDED = "deadline_exceeded"
