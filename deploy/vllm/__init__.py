"""The vLLM ranker server: launcher (CPU and GPU profiles) with health wait and warm-up."""
