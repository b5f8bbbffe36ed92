"""Property-based fuzzing of both live services' OpenAPI schemas with schemathesis.

Every generated request, valid (positive) or not (negative), must get a non-5xx answer whose
status, content type and body match the published schema (problem+json for errors).
Bounded: 50 examples per operation and mode. (schemathesis' pytest plugin does not run under
pytest 9, so the operations' strategies are driven by hypothesis directly.)
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from tests.fixtures.services import INTERNAL_KEY

pytestmark = pytest.mark.integration

CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
]
EXAMPLES = 50


def fuzz(url: str, path: str, method: str, mode: GenerationMode, headers: dict[str, str]) -> None:
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    operation = schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case) -> None:
        case.call_and_validate(base_url=url, headers=headers, checks=CHECKS, timeout=30)

    run()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_gateway_recommend_answers_within_its_schema(service_stack, mode):
    service_stack.ensure_running()
    fuzz(service_stack.gateway.url, "/recommend", "POST", mode, service_stack.headers())


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_gateway_events_answers_within_its_schema(service_stack, mode):
    service_stack.ensure_running()
    fuzz(service_stack.gateway.url, "/events", "POST", mode, service_stack.headers())


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_retrieval_answers_within_its_schema(service_stack, mode):
    service_stack.ensure_running()
    headers = {"Authorization": f"Bearer {INTERNAL_KEY}"}
    fuzz(service_stack.retrieval.url, "/retrieve", "POST", mode, headers)


def test_operational_endpoints_answer_within_their_schema(service_stack):
    service_stack.ensure_running()
    for path in ("/healthz", "/readyz", "/metrics"):
        fuzz(service_stack.gateway.url, path, "GET", GenerationMode.POSITIVE, {})
