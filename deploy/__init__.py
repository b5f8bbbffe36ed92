"""Deployment helpers that run as Python (the vLLM launcher); the rest of deploy/ is config."""
