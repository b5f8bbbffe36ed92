"""The vLLM client's typed errors, each carrying its ``error_type`` metric label.

Unavailability (the server cannot answer now) counts towards the circuit breaker; a bad
response (the server answered, but not usably) does not. The labels are a closed set.
"""

from __future__ import annotations

from ranker.backends.base import RankerBadResponse, RankerTimeout, RankerUnavailable

ERROR_TYPES = (
    "connect",
    "timeout",
    "http_5xx",
    "http_4xx",
    "malformed",
    "circuit_open",
    "mismatch",
)


class VLLMUnavailable(RankerUnavailable):
    """Unavailable, with the metric label saying why."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


class VLLMTimeout(VLLMUnavailable, RankerTimeout):
    """No answer within the call's deadline (or a transport timeout)."""

    def __init__(self, message: str):
        super().__init__("timeout", message)


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
