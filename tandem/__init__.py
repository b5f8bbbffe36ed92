"""Tandem's shared kernel: data, splits, metrics, evaluation, artifact manifests and the CLI."""

__version__ = "0.1.0"
