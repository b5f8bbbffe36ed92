"""The gateway with the vLLM backend: a real vLLM CPU server (tiny Llama + LoRA) as the ranker.

Hybrid prompts (item and user soft tokens) travel as prompt embeddings. The server is shared
with the vLLM tests, so it is paused (SIGSTOP), never killed, to provoke the fallback.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from tandem.testing.processes import free_port, tandem_server

pytestmark = pytest.mark.integration
pytest.importorskip("vllm", reason="vLLM is not installed")


def scores(response: httpx.Response) -> dict[str, float]:
    assert response.status_code == 200, response.text
    return {item["item_id"]: item["score"] for item in response.json()["items"]}


def first_ranked(url: str, body: dict, headers: dict, within_s: float = 60.0) -> httpx.Response:
    """The first answer the ranker scored: on a loaded host the first calls may miss 1.5 s."""
    deadline = time.monotonic() + within_s
    while True:
        response = httpx.post(url + "/recommend", json=body, headers=headers, timeout=30)
        if response.json().get("degraded") == [] or time.monotonic() > deadline:
            return response


def test_gateway_ranks_through_vllm_and_falls_back_when_it_hangs(
    service_stack, vllm_server, tmp_path
):
    service_stack.ensure_running()
    env = {
        **service_stack.gateway.env,
        "TANDEM_RANKER_BACKEND": "vllm",
        "TANDEM_VLLM_URL": vllm_server.url,
        "TANDEM_VLLM_ADAPTER": "rec-v1",
        "TANDEM_RANKER_DEADLINE_MS": "1500",
    }
    gateway = tandem_server("gateway", free_port(), tmp_path / "gateway.log", env, "gateway-vllm")
    gateway.start(timeout_s=180)
    try:
        user = service_stack.users[0]
        body = {"user_id": user, "k": 5}
        via_vllm = first_ranked(gateway.url, body, service_stack.headers())
        assert via_vllm.json()["degraded"] == [], gateway.logs()
        assert via_vllm.json()["model"]["backend"] == "vllm"
        in_process = httpx.post(service_stack.gateway.url + "/recommend", json=body,
                                headers=service_stack.headers(), timeout=30)  # fmt: skip
        remote, local = scores(via_vllm), scores(in_process)
        common = set(remote) & set(local)
        assert len(common) >= 4  # bf16 on the server vs fp32 here may swap a near-tie
        assert max(abs(remote[i] - local[i]) for i in common) < 0.1

        os.kill(vllm_server.process.pid, signal.SIGSTOP)
        try:
            start = time.perf_counter()
            hung = httpx.post(gateway.url + "/recommend", json=body,
                              headers=service_stack.headers(), timeout=30)  # fmt: skip
            elapsed = time.perf_counter() - start
        finally:
            os.kill(vllm_server.process.pid, signal.SIGCONT)
        assert hung.status_code == 200
        assert hung.json()["degraded"] in (["ranker_timeout"], ["ranker_unavailable"])
        assert elapsed < 3.0
        retrieval_order = [item["retrieval_rank"] for item in hung.json()["items"]]
        assert retrieval_order == [1, 2, 3, 4, 5]

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            again = httpx.post(gateway.url + "/recommend", json=body,
                               headers=service_stack.headers(), timeout=30)  # fmt: skip
            if again.json()["degraded"] == []:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the gateway never recovered the vLLM ranker:\n{gateway.logs()}")
    finally:
        gateway.stop()
