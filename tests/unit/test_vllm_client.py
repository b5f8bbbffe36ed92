"""The vLLM client's contract, parsing and failure handling, against a scripted fake server.

The fake speaks vLLM's wire format through ``httpx.MockTransport`` so failures (5xx, bad bodies,
slow answers, refused connections) can be injected; the real server is exercised in
tests/integration/test_vllm_server.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from ranker.backends.base import (
    RankerBadResponse,
    RankerTimeout,
    RankerUnavailable,
    RenderedPrompt,
)
from ranker.backends.vllm import (
    PROBE_TEXT,
    EmbeddingTable,
    ModelMismatchError,
    VLLMBackend,
    VLLMConfig,
    encode_prompt_embeds,
    letter_scores,
)


def _completion(top: dict) -> dict:
    return {"choices": [{"logprobs": {"top_logprobs": [top]}}]}


class FakeVLLM:
    """Answers like a vLLM OpenAI server; ``fail`` (a callable) can take over any request."""

    def __init__(self, model_dir: Path, adapters=("rec-v1",), max_model_len: int = 1024):
        from transformers import AutoTokenizer

        self.probe = AutoTokenizer.from_pretrained(model_dir).encode(
            PROBE_TEXT, add_special_tokens=False
        )
        self.adapters = list(adapters)
        self.max_model_len = max_model_len
        self.requests: list[httpx.Request] = []
        self.fail = None
        self.embeds_shift = 0.0  # != 0: embeddings score differently from token ids

    def models(self) -> dict:
        data = [{"id": "base", "parent": None, "max_model_len": self.max_model_len}]
        data += [{"id": name, "parent": "base", "max_model_len": None} for name in self.adapters]
        return {"object": "list", "data": data}

    def scores(self, body: dict) -> dict:
        allowed = body["allowed_token_ids"]
        raw = np.array([-0.3 * i for i in range(len(allowed))])
        if "prompt_embeds" in body:
            raw[0] += self.embeds_shift
        raw = raw - np.log(np.exp(raw).sum())
        return _completion({f"token_id:{t}": float(v) for t, v in zip(allowed, raw, strict=True)})

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.fail is not None:
            answer = self.fail(request)
            if asyncio.iscoroutine(answer):
                answer = await answer
            if answer is not None:
                return answer
        path = request.url.path
        if path == "/health":
            return httpx.Response(200)
        if path == "/v1/models":
            return httpx.Response(200, json=self.models())
        body = json.loads(request.content) if request.content else {}
        if path == "/tokenize":
            return httpx.Response(200, json={"tokens": self.probe, "count": len(self.probe)})
        if path == "/v1/completions":
            if body["model"] not in ["base", *self.adapters]:
                message = f"The model `{body['model']}` does not exist."
                return httpx.Response(404, json={"error": {"message": message}})
            return httpx.Response(200, json=self.scores(body))
        return httpx.Response(404)

    def completions(self) -> list[dict]:
        return [json.loads(r.content) for r in self.requests if r.url.path == "/v1/completions"]


@pytest.fixture
def fake(tiny_llm_dir: Path) -> FakeVLLM:
    return FakeVLLM(tiny_llm_dir)


def backend_for(
    fake: FakeVLLM, model_dir: Path, registry: CollectorRegistry | None = None, **overrides
) -> VLLMBackend:
    config = VLLMConfig(base_url="http://vllm.test", model_dir=model_dir, **overrides)
    return VLLMBackend(
        config, transport=httpx.MockTransport(fake), registry=registry or CollectorRegistry()
    )


def text_prompt(letters=(10, 11, 12, 13), length: int = 40) -> RenderedPrompt:
    return RenderedPrompt(token_ids=tuple(range(20, 20 + length)), letter_token_ids=letters)


def hybrid_prompt(hidden: int, letters=(10, 11, 12)) -> RenderedPrompt:
    soft = np.random.default_rng(0).normal(size=(2, hidden)).astype(np.float32)
    return RenderedPrompt(
        token_ids=tuple(range(20, 60)),
        letter_token_ids=letters,
        soft_positions=(3, 7),
        soft_vectors=soft,
    )


# --- parsing -------------------------------------------------------------------------------


def test_letter_scores_are_renormalised_over_the_letters():
    raw = {"token_id:5": -2.0, "token_id:6": -3.0, "token_id:7": -4.5}  # full-vocab logprobs
    scores = letter_scores(_completion(raw), [7, 5, 6])
    assert scores.dtype == np.float32
    assert math.isclose(float(np.exp(scores).sum()), 1.0, rel_tol=1e-6)
    assert scores[1] - scores[0] == pytest.approx(2.5) and scores[1] - scores[2] == pytest.approx(1)


def test_a_missing_letter_is_a_bad_response_not_a_guess():
    with pytest.raises(RankerBadResponse, match=r"candidates \[2\]"):
        letter_scores(_completion({"token_id:5": -1.0, "token_id:6": -2.0}), [5, 6, 7])


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"choices": []},
        {"choices": [{"logprobs": None}]},
        _completion(["token_id:5"]),
        _completion({"A": -1.0}),
        _completion({"token_id:5": "high"}),
        _completion({"token_id:5": float("nan")}),
        _completion({"token_id:5": float("-inf")}),
    ],
)
def test_malformed_completions_are_bad_responses(body):
    with pytest.raises(RankerBadResponse):
        letter_scores(body, [5])


# --- wire format ---------------------------------------------------------------------------


def test_embedding_rows_are_bf16_with_the_soft_rows_put_in(tiny_llm_dir: Path):
    table = EmbeddingTable.load(tiny_llm_dir)
    assert table.weight.dtype == torch.bfloat16
    prompt = hybrid_prompt(table.hidden_size)
    rows = table.prompt_rows(prompt)
    assert rows.shape == (len(prompt.token_ids), table.hidden_size)
    assert torch.equal(rows[0], table.weight[prompt.token_ids[0]])
    expected = torch.as_tensor(prompt.soft_vectors).to(torch.bfloat16)
    assert torch.equal(rows[[3, 7]], expected)
    assert torch.equal(table.weight[prompt.token_ids[3]], table.weight[23])  # table untouched


def test_prompt_embeds_wire_format_round_trips_only_the_rows(tiny_llm_dir: Path):
    table = EmbeddingTable.load(tiny_llm_dir)
    rows = table.prompt_rows(text_prompt())
    payload = base64.b64decode(encode_prompt_embeds(rows))
    decoded = torch.load(io.BytesIO(payload), weights_only=True)
    assert torch.equal(decoded, rows)
    assert len(payload) < rows.numel() * 2 + 2048  # not the whole embedding table


def test_soft_vectors_of_the_wrong_width_are_a_caller_error(tiny_llm_dir: Path):
    table = EmbeddingTable.load(tiny_llm_dir)
    with pytest.raises(ValueError, match="project them first"):
        table.prompt_rows(hybrid_prompt(table.hidden_size + 1))


# --- the backend against the fake server ---------------------------------------------------


async def test_each_prompt_is_one_completion_with_the_letter_contract(fake, tiny_llm_dir):
    backend = backend_for(fake, tiny_llm_dir)
    await backend.start()
    assert backend.model == "rec-v1"
    fake.requests.clear()
    table = EmbeddingTable.load(tiny_llm_dir)
    prompts = [text_prompt(), hybrid_prompt(table.hidden_size)]
    scores = await backend.score(prompts, request_id="req-42")
    await backend.close()
    assert [len(s) for s in scores] == [4, 3]
    bodies = fake.completions()
    assert len(bodies) == 2
    for body in bodies:
        assert body["model"] == "rec-v1" and body["max_tokens"] == 1
        assert body["temperature"] == 0 and body["logprobs"] == 20
        assert body["return_tokens_as_token_ids"] is True
    text, hybrid = sorted(bodies, key=lambda b: "prompt_embeds" in b)
    assert text["prompt"] == list(prompts[0].token_ids) and "prompt_embeds" not in text
    assert text["allowed_token_ids"] == [10, 11, 12, 13]
    sent = torch.load(io.BytesIO(base64.b64decode(hybrid["prompt_embeds"])), weights_only=True)
    assert torch.equal(sent, table.prompt_rows(prompts[1])) and "prompt" not in hybrid
    ids = sorted(r.headers["X-Request-ID"] for r in fake.requests)
    assert ids == ["req-42-0", "req-42-1"]


@pytest.mark.parametrize(
    ("status", "body", "error", "label"),
    [
        (500, {"error": {"message": "EngineCore died"}}, RankerUnavailable, "http_5xx"),
        (503, {"error": {"message": "overloaded"}}, RankerUnavailable, "http_5xx"),
        (400, {"error": {"message": "token id out of vocabulary"}}, RankerBadResponse, "http_4xx"),
        (200, "not json", RankerBadResponse, "malformed"),
        (200, {"choices": []}, RankerBadResponse, "malformed"),
    ],
)  # fmt: skip
async def test_server_failures_become_typed_errors(fake, tiny_llm_dir, status, body, error, label):
    registry = CollectorRegistry()
    backend = backend_for(fake, tiny_llm_dir, registry)
    await backend.start()
    content = {"json": body} if isinstance(body, dict) else {"text": body}
    fake.fail = lambda r: httpx.Response(status, **content) if "completions" in r.url.path else None
    labels = {"backend": "vllm", "error_type": label}
    assert registry.get_sample_value("tandem_ranker_errors_total", labels) == 0  # declared
    with pytest.raises(error):
        await backend.score([text_prompt()])
    assert registry.get_sample_value("tandem_ranker_errors_total", labels) == 1
    await backend.close()


async def test_a_slow_server_is_cut_at_the_deadline(fake, tiny_llm_dir):
    backend = backend_for(fake, tiny_llm_dir, deadline_s=0.2)
    await backend.start()

    async def stall(request):
        if "completions" in request.url.path:
            await asyncio.sleep(30)

    fake.fail = stall
    began = time.monotonic()
    with pytest.raises(RankerTimeout, match=r"within 0\.20s"):
        await backend.score([text_prompt(), text_prompt()])
    assert time.monotonic() - began < 1.5  # the deadline, plus scheduling slack on a busy box
    await backend.close()


async def test_connection_errors_are_retried_a_bounded_number_of_times(fake, tiny_llm_dir):
    backend = backend_for(fake, tiny_llm_dir, connect_retries=2, retry_backoff_s=0.001)
    await backend.start()
    attempts = []

    def refuse(request):
        if "completions" in request.url.path:
            attempts.append(request)
            if len(attempts) <= 2:
                raise httpx.ConnectError("connection refused", request=request)

    fake.fail = refuse
    assert len((await backend.score([text_prompt()]))[0]) == 4  # third attempt succeeds
    attempts.clear()
    fake.fail = lambda r: (_ for _ in ()).throw(httpx.ConnectError("refused", request=r))
    with pytest.raises(RankerUnavailable, match="cannot connect"):
        await backend.score([text_prompt()])
    await backend.close()


async def test_the_circuit_opens_fails_fast_and_closes_after_a_good_probe(fake, tiny_llm_dir):
    backend = backend_for(fake, tiny_llm_dir, breaker_failures=2, breaker_cooldown_s=0.2)
    await backend.start()
    fake.fail = lambda r: httpx.Response(500, text="boom") if "completions" in r.url.path else None
    for _ in range(2):
        with pytest.raises(RankerUnavailable, match="500"):
            await backend.score([text_prompt()])
    sent = len(fake.requests)
    with pytest.raises(RankerUnavailable, match="circuit open"):
        await backend.score([text_prompt()])
    assert len(fake.requests) == sent  # failed fast, nothing sent
    assert backend.breaker_state == "open" and not await backend.ready()
    await asyncio.sleep(0.25)
    assert backend.breaker_state == "half_open" and await backend.ready()
    with pytest.raises(RankerUnavailable, match="500"):
        await backend.score([text_prompt()])  # the probe fails: open for another cool-down
    with pytest.raises(RankerUnavailable, match="circuit open"):
        await backend.score([text_prompt()])
    await asyncio.sleep(0.25)
    fake.fail = None
    await backend.score([text_prompt()])  # the probe succeeds
    assert backend.breaker_state == "closed"
    await backend.close()


async def test_a_call_its_caller_cancels_does_not_open_the_circuit(fake, tiny_llm_dir):
    backend = backend_for(fake, tiny_llm_dir, breaker_failures=1)
    await backend.start()

    async def stall(request):
        if "completions" in request.url.path:
            await asyncio.sleep(30)

    fake.fail = stall
    with pytest.raises(TimeoutError):  # the gateway's stage deadline, not the client's
        await asyncio.wait_for(backend.score([text_prompt()], deadline_s=10), 0.1)
    assert backend.breaker_state == "closed"
    with pytest.raises(RankerUnavailable, match="within"):
        await backend.score([text_prompt()], deadline_s=0.1)  # the client's own deadline
    assert backend.breaker_state == "open"
    await backend.close()


async def test_bad_requests_do_not_open_the_circuit(fake, tiny_llm_dir):
    backend = backend_for(fake, tiny_llm_dir, breaker_failures=1)
    await backend.start()
    fake.fail = lambda r: httpx.Response(400, json={"error": {"message": "bad"}})
    with pytest.raises(RankerBadResponse):
        await backend.score([text_prompt()])
    assert backend.breaker_state == "closed"
    await backend.close()


async def test_auto_model_follows_a_rollback(fake, tiny_llm_dir):
    fake.adapters = ["rec-v1", "rec-v2"]
    backend = backend_for(fake, tiny_llm_dir)
    await backend.start()
    assert backend.model == "rec-v2"
    fake.adapters = ["rec-v1"]  # rolled back on the server
    await backend.score([text_prompt()])
    assert backend.model == "rec-v1"
    assert [b["model"] for b in fake.completions()[-2:]] == ["rec-v2", "rec-v1"]
    await backend.close()


async def test_an_explicit_adapter_that_is_gone_is_a_bad_response(fake, tiny_llm_dir):
    backend = backend_for(fake, tiny_llm_dir, model="rec-v1")
    await backend.start()
    fake.adapters = []
    with pytest.raises(RankerBadResponse, match="does not exist"):
        await backend.score([text_prompt()])
    await backend.close()


async def test_start_refuses_a_missing_adapter_or_another_model(fake, tiny_llm_dir):
    with pytest.raises(ModelMismatchError, match="does not serve 'rec-v9'"):
        await backend_for(fake, tiny_llm_dir, model="rec-v9").start()
    fake.probe = [*fake.probe, 1]
    with pytest.raises(ModelMismatchError, match="tokenizer differs"):
        await backend_for(fake, tiny_llm_dir).start()
    fake.probe = fake.probe[:-1]
    fake.embeds_shift = 0.5
    with pytest.raises(ModelMismatchError, match="other weights"):
        await backend_for(fake, tiny_llm_dir).start()


async def test_prompts_longer_than_the_server_allows_are_refused_locally(fake, tiny_llm_dir):
    fake.max_model_len = 32
    backend = backend_for(fake, tiny_llm_dir)
    await backend.start()
    with pytest.raises(RankerBadResponse, match="max_model_len is 32"):
        await backend.score([text_prompt(length=40)])
    await backend.close()


async def test_scoring_before_start_is_unavailable(fake, tiny_llm_dir):
    with pytest.raises(RankerUnavailable, match="not started"):
        await backend_for(fake, tiny_llm_dir).score([text_prompt()])


async def test_start_against_a_silent_socket_fails_instead_of_hanging(tiny_llm_dir):
    async def swallow(reader, writer):
        await reader.read(65536)  # accept, read, never answer
        await asyncio.sleep(30)

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    backend = VLLMBackend(
        VLLMConfig(
            base_url=f"http://127.0.0.1:{port}", model_dir=tiny_llm_dir, connect_timeout_s=0.3
        )
    )
    began = time.monotonic()
    with pytest.raises(RankerUnavailable, match="not healthy"):
        await backend.start()
    assert time.monotonic() - began < 20  # tokenizer load + one 0.3 s health probe, no hang
    assert not await backend.ready()
    await backend.close()
    server.close()


async def test_prompt_embeddings_are_serialised_off_the_event_loop(fake, tiny_llm_dir, monkeypatch):
    import threading

    from ranker.backends.vllm import backend as backend_module

    threads: list[str] = []
    build = backend_module.completion_body

    def recording(prompt, *args):
        threads.append(threading.current_thread().name)
        return build(prompt, *args)

    monkeypatch.setattr(backend_module, "completion_body", recording)
    backend = backend_for(fake, tiny_llm_dir)
    await backend.start()
    threads.clear()
    hidden = EmbeddingTable.load(tiny_llm_dir).hidden_size
    await backend.score([hybrid_prompt(hidden), hybrid_prompt(hidden)])
    await backend.close()
    assert len(threads) == 2
    assert all(name.startswith("vllm-encode") for name in threads), threads
