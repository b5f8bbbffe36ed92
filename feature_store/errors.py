"""The error every feature-store operation raises when it cannot proceed."""

from __future__ import annotations


class FeatureStoreError(RuntimeError):
    """An operation on the store cannot proceed; the message says why and what to do."""
