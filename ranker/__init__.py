"""Stage 2: an LLM reads one hybrid prompt and scores the candidates' index letters."""
