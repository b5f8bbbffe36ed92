"""Where artifacts live: ``$TANDEM_ARTIFACTS_DIR`` or ``./artifacts``."""

from __future__ import annotations

import os
from pathlib import Path


def artifacts_root() -> Path:
    return Path(os.environ.get("TANDEM_ARTIFACTS_DIR", "artifacts"))


def dataset_dir(dataset: str) -> Path:
    """Prepared data of ``dataset``: ``artifacts/<dataset>/data``."""
    return artifacts_root() / dataset / "data"


def models_root() -> Path:
    """Small trained models shipped with the repository: ``$TANDEM_MODELS_DIR`` or ``./models``."""
    return Path(os.environ.get("TANDEM_MODELS_DIR", "models"))
