"""``POST /events`` on the multi-process stack (real uvicorn, real Redis): read-your-writes,
per-event rejection, idempotency across a gateway restart, and 503 when Redis is down."""

from __future__ import annotations

import uuid

import httpx
import pytest
import redis

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(service_stack):
    service_stack.ensure_running()
    return service_stack


def post(stack, path: str, body: dict) -> httpx.Response:
    return httpx.post(stack.gateway.url + path, json=body, headers=stack.headers(), timeout=30)


def events(user: str, items: list[str], tag: str | None = None) -> list[dict]:
    tag = tag or uuid.uuid4().hex[:8]
    return [
        {"event_id": f"{tag}-{n}", "user_id": user, "item_id": item, "ts": 1_700_000_000.0 + n}
        for n, item in enumerate(items)
    ]


def stream(stack) -> redis.Redis:
    return redis.Redis(port=stack.redis.port)


def test_the_next_recommend_reads_the_events_as_the_newest_history(stack):
    user, items = f"live-{uuid.uuid4().hex[:8]}", stack.item_ids[:3]
    cold = post(stack, "/recommend", {"user_id": user, "k": 10}).json()
    assert "cold_start" in cold["degraded"]
    answer = post(stack, "/events", {"events": events(user, items)})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"accepted": 3, "duplicates": 0, "rejected": []}
    warm = post(stack, "/recommend", {"user_id": user, "k": 10}).json()
    given = post(stack, "/recommend", {"user_id": user, "k": 10, "history": items}).json()
    assert warm["degraded"] == [] and warm["items"] == given["items"]
    assert not {i["item_id"] for i in warm["items"]} & set(items)


def test_events_extend_a_published_users_stored_history(stack):
    user = stack.users[5]
    client = stream(stack)
    version = int(client.get(f"tandem:{stack.namespace}:current"))
    stored = redis_history(client, stack.namespace, version, user)
    new = [i for i in stack.item_ids if i not in stored][:2]
    assert post(stack, "/events", {"events": events(user, new)}).json()["accepted"] == 2
    live = post(stack, "/recommend", {"user_id": user, "k": 5}).json()
    given = post(stack, "/recommend", {"user_id": user, "k": 5, "history": [*stored, *new]})
    assert live["items"] == given.json()["items"]


def redis_history(client: redis.Redis, namespace: str, version: int, user: str) -> list[str]:
    import json

    return json.loads(client.hget(f"tandem:{namespace}:v{version}:user:{user}", "history"))


def test_a_bad_event_is_rejected_with_a_reason_and_the_rest_go_in(stack):
    user = f"mixed-{uuid.uuid4().hex[:8]}"
    batch = events(user, [stack.item_ids[0], "no-such-item", stack.item_ids[1]])
    batch.insert(2, {"event_id": "bad-ts", "user_id": user, "item_id": stack.item_ids[2], "ts": -1})
    batch.append({"user_id": user, "item_id": stack.item_ids[3]})  # no event_id
    body = post(stack, "/events", {"events": batch}).json()
    assert body["accepted"] == 2 and body["duplicates"] == 0
    rejected = {r["index"]: r for r in body["rejected"]}
    assert sorted(rejected) == [1, 2, 4]
    assert "unknown item 'no-such-item'" in rejected[1]["detail"]
    assert rejected[2]["event_id"] == "bad-ts" and "ts" in rejected[2]["detail"]
    assert rejected[4]["event_id"] is None and "event_id" in rejected[4]["detail"]
    tail = stream(stack).lrange(f"tandem:{stack.namespace}:live:{user}", 0, -1)
    assert [entry.split(b"\t")[1].decode() for entry in tail] == stack.item_ids[:2]


def test_an_event_id_counts_once_across_a_gateway_restart(stack):
    user = f"again-{uuid.uuid4().hex[:8]}"
    batch = events(user, stack.item_ids[:4])
    client = stream(stack)
    before = client.xlen(f"tandem:{stack.namespace}:events")
    assert post(stack, "/events", {"events": batch}).json()["accepted"] == 4
    stack.gateway.stop()
    stack.gateway.start(180)
    again = post(stack, "/events", {"events": [*batch, *events(user, stack.item_ids[4:5])]})
    assert again.json() == {"accepted": 1, "duplicates": 4, "rejected": []}
    assert client.xlen(f"tandem:{stack.namespace}:events") == before + 5
    assert client.llen(f"tandem:{stack.namespace}:live:{user}") == 5


def test_malformed_or_oversized_bodies_get_problem_json(stack):
    for body in ({"events": []}, {"events": [{}] * 501}, {"events": [1]}, {"event": []}):
        answer = post(stack, "/events", body)
        assert answer.status_code == 422, body
        assert answer.headers["content-type"] == "application/problem+json"


def test_an_unreachable_store_answers_503_with_retry_after_and_records_nothing(stack):
    user = f"down-{uuid.uuid4().hex[:8]}"
    stack.redis.stop()
    try:
        answer = post(stack, "/events", {"events": events(user, stack.item_ids[:2])})
    finally:
        stack.ensure_running()
    assert answer.status_code == 503
    assert answer.headers["content-type"] == "application/problem+json"
    assert int(answer.headers["retry-after"]) >= 1
    assert stream(stack).llen(f"tandem:{stack.namespace}:live:{user}") == 0
    metrics = httpx.get(stack.gateway.url + "/metrics").text
    assert 'tandem_events_total{result="accepted"}' in metrics
    assert "tandem_events_stream_length" in metrics


def test_a_click_on_a_served_item_counts_for_the_answers_variant_at_its_rank(stack):
    import time

    from feature_store.attribution import AttributionKeys, read_counts

    user = stack.users[7]
    answer = post(stack, "/recommend", {"user_id": user, "k": 10}).json()
    client = stream(stack)
    key = AttributionKeys(stack.namespace).answer(answer["request_id"])
    deadline = time.monotonic() + 10
    while not client.exists(key) and time.monotonic() < deadline:  # recorded after the answer
        time.sleep(0.05)
    variant = answer["model"]["variant"]
    before = {c.variant: c for c in read_counts(client, stack.namespace)}[variant]

    clicked = answer["items"][2]["item_id"]
    click = events(user, [clicked])[0] | {"type": "click", "request_id": answer["request_id"]}
    assert post(stack, "/events", {"events": [click]}).json()["accepted"] == 1
    after = {c.variant: c for c in read_counts(client, stack.namespace)}[variant]
    assert after.clicks == before.clicks + 1
    assert after.clicks_by_rank.get(3, 0) == before.clicks_by_rank.get(3, 0) + 1
    assert after.requests >= before.requests
