"""Tandem's online services: the ``POST /recommend`` gateway and the retrieval service."""
