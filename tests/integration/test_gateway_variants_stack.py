"""Variants on the real multi-process stack: a gateway process (uvicorn) splits users between
two rankers, and a promote and a rollback under load (``tandem variants``) reach it without a
restart and without a failed request. Twice: the in-process tiny ranker at two fusion weights,
and two adapters (``rec-v1``, ``rec-v2``) on the session's vLLM CPU server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from typer.testing import CliRunner

from ranker.adapters import ServerAdapters
from services.common.variants import VariantsConfig
from tandem.testing.processes import free_port, tandem_server

pytestmark = pytest.mark.integration

IN_PROCESS = {
    "salt": "stack-test",
    "variants": [
        {"name": "first", "share": 0.5, "rank_weight": 0.5},
        {"name": "second", "share": 0.5, "rank_weight": 1.0},
    ],
}
ON_VLLM = {
    "salt": "vllm-test",
    "variants": [
        {"name": "first", "share": 0.5, "adapter": "rec-v1"},
        {"name": "second", "share": 0.5, "adapter": "rec-v2"},
    ],
}


def ranked(url: str, user: str, headers: dict, within_s: float = 60.0) -> dict:
    """The first answer the ranker scored (a loaded host may miss the first deadlines)."""
    deadline = time.monotonic() + within_s
    while True:
        response = httpx.post(
            url + "/recommend", json={"user_id": user, "k": 5}, headers=headers, timeout=30
        )
        assert response.status_code == 200, response.text
        if response.json()["degraded"] == [] or time.monotonic() > deadline:
            return response.json()


@pytest.fixture(params=["inprocess", "vllm"])
def variants_env(request, service_stack) -> Iterator[tuple[dict, dict, list[str]]]:
    """(gateway env, variants, extra promote options) for each backend; vLLM loads rec-v2."""
    if request.param == "inprocess":
        yield {"TANDEM_VARIANTS": json.dumps(IN_PROCESS)}, IN_PROCESS, []
        return
    pytest.importorskip("vllm", reason="vLLM is not installed")
    server = request.getfixturevalue("vllm_server")
    models = request.getfixturevalue("vllm_models")
    with ServerAdapters(server.url) as admin:
        admin.load("rec-v2", str(models.adapter_v2))
    env = {
        "TANDEM_RANKER_BACKEND": "vllm",
        "TANDEM_VLLM_URL": server.url,
        "TANDEM_RANKER_DEADLINE_MS": "3000",
        "TANDEM_VARIANTS": json.dumps(ON_VLLM),
    }
    try:
        yield env, ON_VLLM, ["--vllm-url", server.url]
    finally:
        with ServerAdapters(server.url) as admin:
            if "rec-v2" in admin.loaded():
                admin.unload("rec-v2")


def test_users_are_split_and_a_promote_under_load_reaches_the_gateway(
    service_stack, variants_env, tmp_path
):
    service_stack.ensure_running()
    extra, variants, check = variants_env
    env = {**service_stack.gateway.env, **extra, "TANDEM_VARIANTS_POLL_S": "0.5"}
    gateway = tandem_server("gateway", free_port(), tmp_path / "gateway.log", env, "gw-variants")
    headers = service_stack.headers()
    redis_url = f"redis://127.0.0.1:{service_stack.redis.port}/0"
    where = ["--redis-url", redis_url, "--namespace", service_stack.namespace]
    try:
        gateway.start(timeout_s=180)
        split = VariantsConfig.model_validate(variants).split()
        users = service_stack.users[:10]
        answers = {u: ranked(gateway.url, u, headers) for u in users}
        assert {u: a["model"]["variant"] for u, a in answers.items()} == {
            u: split.assign(u) for u in users
        }, gateway.logs()
        assert {a["model"]["variant"] for a in answers.values()} == {"first", "second"}
        backend = env.get("TANDEM_RANKER_BACKEND", "inprocess")
        assert all(a["model"]["backend"] == backend for a in answers.values())
        on_first = next(u for u in users if split.assign(u) == "first")

        failures: list[str] = []
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(base_url=gateway.url, headers=headers, timeout=30) as client:
                while not stop.is_set():
                    for user in users:
                        response = client.post("/recommend", json={"user_id": user, "k": 5})
                        if response.status_code != 200:
                            failures.append(response.text)

        workers = [threading.Thread(target=load) for _ in range(2)]
        for worker in workers:
            worker.start()
        try:
            runner = CliRunner()
            cli = ["variants", "promote", "second", *check, *where]
            out = runner.invoke(_app(), cli)
            assert out.exit_code == 0, out.output
            promoted = time.monotonic()
            while ranked(gateway.url, on_first, headers)["model"]["variant"] != "second":
                assert time.monotonic() - promoted < 5, "the promote did not arrive within 5 s"
            after = ranked(gateway.url, on_first, headers)
            out = runner.invoke(_app(), ["variants", "rollback", *where])
            assert out.exit_code == 0, out.output
            rolled = time.monotonic()
            while ranked(gateway.url, on_first, headers)["model"]["variant"] != "first":
                assert time.monotonic() - rolled < 5, "the rollback did not arrive within 5 s"
        finally:
            stop.set()
            for worker in workers:
                worker.join()
        assert not failures
        before = {i["item_id"]: i["score"] for i in answers[on_first]["items"]}
        promoted_scores = {i["item_id"]: i["score"] for i in after["items"]}
        assert after["degraded"] == [] and before != promoted_scores  # the other ranker scored
    finally:
        gateway.stop()
        import redis

        client = redis.Redis.from_url(redis_url)
        client.delete(f"tandem:{service_stack.namespace}:variants")
        client.close()


def _app():
    from tandem.cli import app

    return app
