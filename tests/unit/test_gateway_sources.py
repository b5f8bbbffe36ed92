"""The gateway's retrieval client against a loopback HTTP server that answers as told."""

from __future__ import annotations

import json

import pytest
from aiohttp import web

from services.common.context import request_id_var
from services.gateway.sources import RemoteCandidates, RetrievalUnavailable
from tandem.testing.processes import free_port

GOOD = {
    "candidates": [{"item_id": "7", "score": 1.5}, {"item_id": "9", "score": 0.5}],
    "user_embedding": [0.25, -1.0],
    "source": "retriever",
}


@pytest.fixture
async def server():
    """A server whose next answer (status, body) the test sets; it records what it got."""
    state = {"answer": (200, json.dumps(GOOD)), "seen": []}

    async def retrieve(request: web.Request) -> web.Response:
        state["seen"].append((dict(request.headers), await request.json()))
        status, body = state["answer"]
        return web.Response(status=status, text=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/retrieve", retrieve)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    state["url"] = f"http://127.0.0.1:{port}"
    yield state
    await runner.cleanup()


@pytest.fixture
async def source(server):
    remote = RemoteCandidates(server["url"], api_key="k1")
    await remote.start()
    yield remote
    await remote.close()


async def test_an_answer_becomes_candidates_and_the_user_vector(server, source):
    token = request_id_var.set("req-1")
    try:
        got = await source.retrieve(["1", "2"], 2, ["3"])
    finally:
        request_id_var.reset(token)
    assert got.candidates == [("7", 1.5), ("9", 0.5)]
    assert got.user_embedding.tolist() == [0.25, -1.0]
    headers, body = server["seen"][0]
    assert headers["Authorization"] == "Bearer k1" and headers["X-Request-ID"] == "req-1"
    assert body == {"history": ["1", "2"], "k": 2, "exclude": ["3"], "include_user_embedding": True}


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ((503, json.dumps({"detail": "loading"})), "answered 503: loading"),
        ((500, "<html>oops</html>"), "answered 500: <html>oops</html>"),
        ((200, "not json"), "malformed retrieval response"),
        ((200, json.dumps({"candidates": [{"item_id": "7"}]})), "malformed retrieval response"),
    ],
)
async def test_errors_and_malformed_answers_are_unavailable(server, source, answer, message):
    server["answer"] = answer
    with pytest.raises(RetrievalUnavailable, match=message):
        await source.retrieve(["1"], 2, [])


async def test_nobody_listening_is_unavailable():
    remote = RemoteCandidates(f"http://127.0.0.1:{free_port()}")
    await remote.start()
    try:
        with pytest.raises(RetrievalUnavailable, match="unreachable"):
            await remote.retrieve(["1"], 2, [])
        assert not await remote.ready()
    finally:
        await remote.close()
