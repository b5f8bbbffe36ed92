"""The deployed shape on loopback: redis-server + retrieval + gateway as separate uvicorn
processes (``service_stack``). Fallbacks are provoked by really stopping a component."""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest

from tests.fixtures.services import INTERNAL_KEY

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(service_stack):
    """The session stack, made whole first (restarts what an earlier test stopped)."""
    service_stack.ensure_running()
    return service_stack


def post(stack, body: dict, **headers: str) -> httpx.Response:
    return httpx.post(
        stack.gateway.url + "/recommend", json=body, headers=stack.headers(**headers), timeout=30
    )


def test_known_user_is_ranked_end_to_end(stack):
    response = post(stack, {"user_id": stack.users[0], "k": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["degraded"] == [] and len(body["items"]) == 5
    assert {"feature_user", "retrieval", "feature_items", "prompt", "ranker"} <= set(
        body["timings_ms"]
    )
    assert body["model"]["ranker_run"] == "tiny-ranker"


def test_request_id_is_returned_and_reaches_the_retrieval_service(stack):
    response = post(stack, {"user_id": stack.users[1]}, **{"X-Request-ID": "trace-me-42"})
    assert response.headers["x-request-id"] == "trace-me-42"
    assert response.json()["request_id"] == "trace-me-42"
    for service, route in ((stack.retrieval, "/retrieve"), (stack.gateway, "/recommend")):
        # access logs are written after the answer leaves: wait for each line a while
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            lines = [json.loads(x) for x in service.log_path.read_text().splitlines()
                     if x.startswith("{")]  # fmt: skip
            if any(x.get("request_id") == "trace-me-42" and x.get("route") == route for x in lines):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"{service.name} never logged the request id on {route}")


def test_auth_and_problem_bodies_over_http(stack):
    missing = httpx.post(stack.gateway.url + "/recommend", json={"user_id": "u"}, timeout=10)
    assert missing.status_code == 401
    assert missing.headers["content-type"] == "application/problem+json"
    bad = post(stack, {"user_id": "u", "k": 0})
    assert bad.status_code == 422 and "k" in bad.json()["detail"]
    assert httpx.get(stack.gateway.url + "/healthz").status_code == 200
    assert httpx.get(stack.gateway.url + "/readyz").json()["checks"] == {
        "artifacts": True, "retrieval": True, "feature_store": True, "ranker": True,
    }  # fmt: skip
    metrics = httpx.get(stack.gateway.url + "/metrics").text
    assert "tandem_http_requests_total" in metrics
    retrieval_metrics = httpx.get(stack.retrieval.url + "/metrics").text
    assert "tandem_retrieval_duration_seconds_count" in retrieval_metrics


def test_retrieval_service_wants_its_own_key_which_the_gateway_sends(stack):
    body = {"history": stack.item_ids[:3], "k": 4}
    refused = httpx.post(stack.retrieval.url + "/retrieve", json=body, timeout=10)
    assert refused.status_code == 401
    with_gateway_key = httpx.post(
        stack.retrieval.url + "/retrieve", json=body, timeout=10,
        headers={"Authorization": f"Bearer {INTERNAL_KEY}"},
    )  # fmt: skip
    assert len(with_gateway_key.json()["candidates"]) == 4
    assert post(stack, {"user_id": stack.users[6]}).json()["degraded"] == []


def test_redis_stopped_then_restarted(stack):
    user = stack.users[2]
    stack.redis.stop()
    down = post(stack, {"user_id": user, "k": 5})
    assert down.status_code == 200 and down.json()["degraded"] == ["feature_store_unavailable"]
    assert len(down.json()["items"]) == 5
    stack.redis.start()
    assert _eventually(lambda: post(stack, {"user_id": user}).json()["degraded"] == [])


def test_redis_hung_times_out_within_the_deadline(stack):
    stack.redis.pause()
    try:
        start = time.perf_counter()
        hung = post(stack, {"user_id": stack.users[3], "k": 5})
        elapsed = time.perf_counter() - start
    finally:
        stack.redis.resume()
    assert hung.status_code == 200 and "feature_store_unavailable" in hung.json()["degraded"]
    assert elapsed < 3.0


def test_retrieval_crashed_then_restarted(stack):
    user = stack.users[4]
    stack.retrieval.stop(signal.SIGKILL)
    down = post(stack, {"user_id": user, "k": 5})
    assert down.status_code == 200 and down.json()["degraded"] == ["retrieval_unavailable"]
    assert len(down.json()["items"]) == 5
    stack.retrieval.start()
    assert _eventually(lambda: post(stack, {"user_id": user}).json()["degraded"] == [])


def test_graceful_shutdown_lets_in_flight_requests_finish(stack):
    """SIGTERM while a request is in flight: it completes, then the server exits cleanly."""
    import threading

    results: list[int] = []
    stack.redis.pause()  # hold the request in the feature stage for its 500 ms deadline
    worker = threading.Thread(
        target=lambda: results.append(post(stack, {"user_id": stack.users[5]}).status_code)
    )
    worker.start()
    time.sleep(0.2)
    code = stack.gateway.stop(signal.SIGTERM)
    stack.redis.resume()
    worker.join(10)
    assert results == [200]
    # uvicorn re-raises the signal once its shutdown is complete
    assert code in (0, -signal.SIGTERM), stack.gateway.logs()
    assert "Application shutdown complete" in stack.gateway.logs(tail=10)
    stack.gateway.launch()  # restart in the background; the next user waits for it


def _eventually(check, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return True
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    return False
