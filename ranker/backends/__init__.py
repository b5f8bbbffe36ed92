"""Ranker backends: one interface, in-process (transformers) and remote (vLLM) implementations."""
