"""One set of Prometheus collectors per registry, however many clients ask for it.

prometheus_client refuses to register a metric name twice in one registry, yet several clients
of a store or backend live in one process (and tests pass fresh registries). A module decorates
its ``build(registry)`` with ``per_registry`` and every caller gets the same set back.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import TypeVar

from prometheus_client import REGISTRY, CollectorRegistry

T = TypeVar("T")


def per_registry(build: Callable[[CollectorRegistry], T]) -> Callable[..., T]:
    """``build`` called once per registry (default: the process-wide one), then remembered."""
    made: weakref.WeakKeyDictionary[CollectorRegistry, T] = weakref.WeakKeyDictionary()

    @functools.wraps(build)
    def metric_set(registry: CollectorRegistry = REGISTRY) -> T:
        if registry not in made:
            made[registry] = build(registry)
        return made[registry]

    return metric_set
