"""``--llm-url``: preference extraction against a real vLLM server (OpenAI-compatible API)."""

from __future__ import annotations

import pytest

from enrichment.generation import GenerationError, OpenAIGenerator
from enrichment.preferences import PreferenceConfig, item_lines, summarise_users, user_histories
from tandem.testing.data import synthetic_dataset

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_preferences_through_a_vllm_server(vllm_server, api):
    dataset = synthetic_dataset(num_users=3, num_items=20, min_len=6, max_len=8)
    histories = user_histories(dataset)
    generator = OpenAIGenerator(vllm_server.url, api=api, max_new_tokens=8, concurrency=3)
    try:
        assert generator.model == "base"  # the server's first model, found via /v1/models
        states = summarise_users(
            histories,
            item_lines(dataset.catalog),
            generator,
            PreferenceConfig(window=4, stride=2),
        )
    finally:
        generator.close()
    assert [s.user_id for s in states] == [h.user_id for h in histories]
    assert [s.watermark for s in states] == [len(h.items) for h in histories]
    assert generator.completion_tokens > 0


def test_a_server_error_is_reported_with_the_endpoint(vllm_server):
    generator = OpenAIGenerator(vllm_server.url, model="no-such-model", retries=0)
    try:
        with pytest.raises(GenerationError, match="/v1/chat/completions"):
            generator.generate([[{"role": "user", "content": "hello there, how are you"}]])
    finally:
        generator.close()
