"""The sequence encoders and a registry to build one from its name and config dict."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from retriever.models.base import SequenceEncoder
from retriever.models.lrurec import LRURec, LRURecConfig
from retriever.models.sasrec import SASRec, SASRecConfig

MODELS: dict[str, tuple[type, type[SequenceEncoder]]] = {
    "sasrec": (SASRecConfig, SASRec),
    "lrurec": (LRURecConfig, LRURec),
}


def model_config(name: str, overrides: dict[str, Any] | None = None) -> Any:
    """The config dataclass of model ``name`` with ``overrides`` (unknown keys are an error)."""
    if name not in MODELS:
        raise ValueError(f"unknown retriever model {name!r}; choose one of {sorted(MODELS)}")
    config_cls = MODELS[name][0]
    known = {f.name for f in fields(config_cls)}
    overrides = overrides or {}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"{name} has no option(s) {unknown}; known: {sorted(known)}")
    return config_cls(**overrides)


def build_model(name: str, num_items: int, config: dict[str, Any] | None = None) -> SequenceEncoder:
    """A freshly initialised encoder (seed torch first for reproducible weights)."""
    return MODELS[name][1](num_items, model_config(name, config))


def config_dict(model: SequenceEncoder) -> dict[str, Any]:
    return asdict(model.config)


__all__ = [
    "MODELS",
    "LRURec",
    "LRURecConfig",
    "SASRec",
    "SASRecConfig",
    "SequenceEncoder",
    "build_model",
    "config_dict",
    "model_config",
]
