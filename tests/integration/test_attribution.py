"""Click attribution on a real Redis: answers recorded, events attributed exactly once."""

from __future__ import annotations

import math

import pytest
import redis
from prometheus_client import CollectorRegistry

from feature_store.attribution import ANSWER_TTL_S, AnswerLog, AttributionKeys, read_counts
from feature_store.client import FeatureStoreUnavailable
from feature_store.connection import async_client
from feature_store.events import EventStore
from feature_store.live import Event
from services.gateway.attribution import Attribution, figures

pytestmark = pytest.mark.integration


@pytest.fixture
async def answers(redis_url, namespace):
    client = async_client(
        redis_url, socket_timeout=1, connect_timeout=1, max_connections=4, pool_timeout=1
    )
    yield AnswerLog(client, namespace, deadline=5.0)  # a loaded CI host is no fault
    await client.aclose()


@pytest.fixture
async def store(redis_url, namespace):
    events = EventStore(redis_url, namespace)
    yield events
    await events.close()


def click(n: int, request_id: str, item: str, user: str = "u1") -> Event:
    return Event(f"e{n}", user, item, type="click", ts=1000.0 + n, request_id=request_id)


async def test_a_click_on_an_answered_item_is_a_hit_for_its_variant_at_its_rank(
    redis_url, namespace, answers, store
):
    await answers.record("r1", "u1", "control", ["i1", "i2", "i3"])
    await answers.record("r2", "u2", "canary", ["i3", "i4"])
    result = await store.ingest([click(1, "r1", "i3"), click(2, "r2", "i4", user="u2")])
    assert result.accepted == [True, True] and result.attributed == 2

    counts = {c.variant: c for c in read_counts(redis.Redis.from_url(redis_url), namespace)}
    assert counts["control"].requests == 1 and counts["control"].clicks == 1
    assert counts["control"].clicks_by_rank == {3: 1}
    assert counts["control"].mean_reciprocal_rank == pytest.approx(1 / 3)
    assert counts["canary"].clicks_by_rank == {2: 1}
    ttl = redis.Redis.from_url(redis_url).ttl(AttributionKeys(namespace).answer("r1"))
    assert 0 < ttl <= ANSWER_TTL_S


async def test_repeats_strangers_and_unknown_answers_are_not_counted(
    redis_url, namespace, answers, store
):
    await answers.record("r1", "u1", "control", ["i1", "i2"])
    first = await store.ingest([click(1, "r1", "i1")])
    again = await store.ingest(
        [
            click(1, "r1", "i1"),  # the same event id: a duplicate
            click(2, "r1", "i1"),  # a new event on an item already attributed
            click(3, "r1", "i9"),  # not in the answer
            click(4, "r1", "i2", user="u2"),  # someone else's request id
            click(5, "nope", "i2"),  # no such answer
            Event("e6", "u1", "i2"),  # no request id
        ]
    )
    assert first.attributed == 1 and again.attributed == 0
    (control,) = read_counts(redis.Redis.from_url(redis_url), namespace)
    assert (control.requests, control.clicked_requests, control.clicks) == (1, 1, 1)

    second = await store.ingest([click(7, "r1", "i2")])  # another item of the same answer
    assert second.attributed == 1
    (control,) = read_counts(redis.Redis.from_url(redis_url), namespace)
    assert (control.clicked_requests, control.clicks) == (1, 2)


async def test_the_gauges_report_rates_and_the_test_against_the_control(
    redis_url, namespace, answers, store
):
    for n in range(20):
        await answers.record(f"c{n}", "u1", "control", ["i1", "i2"])
        await answers.record(f"v{n}", "u1", "canary", ["i1", "i2"])
    await store.ingest([click(n, f"c{n}", "i2") for n in range(2)])
    await store.ingest([click(100 + n, f"v{n}", "i1") for n in range(12)])
    registry = CollectorRegistry()
    attribution = Attribution(answers, lambda: "control", registry=registry)
    rows = {row.counts.variant: row for row in await attribution.refresh()}

    assert rows["control"].ctr == pytest.approx(0.1) and math.isnan(rows["control"].p_value)
    assert rows["canary"].ctr == pytest.approx(0.6) and rows["canary"].mrr == 1.0
    assert rows["canary"].ctr_low < 0.6 < rows["canary"].ctr_high
    assert rows["canary"].p_value < 0.01
    sample = registry.get_sample_value("tandem_variant_ctr", {"variant": "canary"})
    assert sample == pytest.approx(0.6)


async def test_a_lost_redis_costs_only_attribution_and_is_counted(redis_process):
    client = async_client(
        redis_process.url, socket_timeout=0.2, connect_timeout=0.2, max_connections=2,
        pool_timeout=0.2,
    )  # fmt: skip
    registry = CollectorRegistry()
    attribution = Attribution(AnswerLog(client, "t", deadline=0.3), lambda: None, registry=registry)
    redis_process.stop()
    await attribution.on_answer("r1", "u1", "control", ["i1"])  # does not raise
    assert registry.get_sample_value("tandem_attribution_record_failures_total") == 1
    with pytest.raises(FeatureStoreUnavailable):
        await attribution.refresh()
    await client.aclose()


def test_figures_without_a_control_run_no_test():
    from feature_store.attribution import VariantCounts

    rows = figures([VariantCounts("a", 10, 1, 1, 1.0, {1: 1})], control=None)
    assert rows[0].ctr == pytest.approx(0.1) and math.isnan(rows[0].p_value)


async def test_the_report_command_prints_each_variant_against_the_control(
    redis_url, namespace, answers, store
):
    from typer.testing import CliRunner

    from tandem.cli import app

    for n in range(10):
        await answers.record(f"c{n}", "u1", "control", ["i1", "i2"])
        await answers.record(f"v{n}", "u1", "canary", ["i1", "i2"])
    await store.ingest([click(n, f"v{n}", "i2") for n in range(5)])
    options = ["--redis-url", redis_url, "--namespace", namespace, "--control", "control"]
    result = CliRunner().invoke(app, ["variants", "report", *options, "--json"])
    assert result.exit_code == 0, result.output
    import json

    rows = {row["variant"]: row for row in json.loads(result.output)}
    assert rows["canary"]["ctr"] == pytest.approx(0.5) and rows["canary"]["mrr"] == 0.5
    assert rows["control"]["control"] and rows["control"]["ctr"] == 0.0
    assert rows["canary"]["p_value"] < 0.05

    table = CliRunner().invoke(app, ["variants", "report", *options])
    assert table.exit_code == 0 and "canary" in table.output and "50.00%" in table.output


def test_the_report_command_says_when_nothing_was_recorded(redis_url, namespace):
    from typer.testing import CliRunner

    from tandem.cli import app

    result = CliRunner().invoke(
        app, ["variants", "report", "--redis-url", redis_url, "--namespace", namespace]
    )
    assert result.exit_code != 0 and "no answers recorded" in result.output


async def test_the_gauge_refresher_starts_and_stops_promptly(answers):
    import asyncio

    registry = CollectorRegistry()
    await answers.record("r1", "u1", "control", ["i1"])
    attribution = Attribution(answers, lambda: "control", registry=registry, refresh_s=60)
    attribution.start()
    for _ in range(200):  # the first refresh runs at once
        if registry.get_sample_value("tandem_variant_requests", {"variant": "control"}):
            break
        await asyncio.sleep(0.05)
    assert registry.get_sample_value("tandem_variant_requests", {"variant": "control"}) == 1
    async with asyncio.timeout(5):  # not after the 60 s sleep
        await attribution.close()
