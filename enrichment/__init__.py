"""Offline feature producers: multimodal item embeddings, item captions, user preference texts.

Everything here runs in batch jobs (CLI: ``tandem enrich ...``) and writes run folders with
manifests; serving only reads what these jobs published to the feature store.
"""
