"""The gateway: user features -> retrieval -> item features -> LLM ranker -> fused top-k."""
