"""Fixture modules live in tests/fixtures/, one per real component they start or build."""

pytest_plugins = [
    "tests.fixtures.data",
    "tests.fixtures.deploy",
    "tests.fixtures.enrichment",
    "tests.fixtures.redis",
    "tests.fixtures.retriever",
    "tests.fixtures.services",
    "tests.fixtures.tiny_llm",
    "tests.fixtures.vllm_server",
]
