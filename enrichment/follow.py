"""``tandem events follow``: keep preference texts fresh from the events stream.

A consumer-group worker: it reads batches of events, counts them per user, and once a user
has at least ``min_events`` new ones it refreshes that user's preference text with the
incremental CoT-Rec path (``enrichment.preferences.summarise_users``: the stored summary plus
only the unread part of the history). The refresh and the acknowledgement of the batch are one
atomic commit (``feature_store.event_log.EventLog.commit``), so a worker killed mid-batch and
restarted redoes that batch and nothing else: no event is lost or applied twice.
"""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import redis
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from enrichment.generation import Generator
from enrichment.preferences import (
    PreferenceConfig,
    PreferenceState,
    UserHistory,
    item_lines,
    summarise_users,
)
from feature_store.event_log import EventLog, Refresh
from tandem.data import Catalog

log = logging.getLogger(__name__)
RETRY_S = 1.0  # pause after a Redis connection error before the next attempt


@dataclass(frozen=True)
class FollowConfig:
    group: str = "preferences"  # consumer group: one per kind of job reading the stream
    consumer: str = "follower-1"  # stable per worker, so a restart finds its pending entries
    min_events: int = 5  # new events that trigger a user's refresh
    batch: int = 100  # entries per commit
    block_ms: int = 1000  # wait for new entries this long per read
    claim_idle_ms: int = 60_000  # take over other consumers' entries idle this long
    start: str = "0"  # where a new group starts: "0" all retained entries, "$" new only

    def __post_init__(self) -> None:
        if self.min_events < 1 or self.batch < 1:
            raise ValueError("min_events and batch must be at least 1")


class FollowMetrics:
    """Prometheus counters of the worker (its own registry, or the process default)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY):
        self.events = Counter(
            "tandem_events_followed",
            "Stream entries committed by the preference worker, by result (applied; "
            "trimmed = removed by retention before delivery).",
            ["result"],
            registry=registry,
        )
        self.refreshes = Counter(
            "tandem_events_preference_refreshes",
            "Preference texts refreshed from live events.",
            registry=registry,
        )
        self.lag = Gauge(
            "tandem_events_consumer_lag",
            "Stream entries the consumer group has not acknowledged (pending + undelivered).",
            ["group"],
            registry=registry,
        )
        for result in ("applied", "trimmed"):
            self.events.labels(result)


@dataclass
class StepResult:
    delivered: int = 0
    applied: int = 0
    refreshed: int = 0


class PreferenceFollower:
    """One worker of the ``config.group`` consumer group; ``step()`` handles one batch."""

    def __init__(
        self,
        events: EventLog,
        catalog: Catalog,
        generator: Generator,
        config: FollowConfig,
        preference: PreferenceConfig | None = None,
        metrics: FollowMetrics | None = None,
    ):
        self.events = events
        self.catalog = catalog
        self.generator = generator
        self.config = config
        self.preference = preference or PreferenceConfig(history="full")
        self.metrics = metrics or FollowMetrics()
        self.lines = item_lines(catalog)
        events.ensure_group(config.group, config.start)

    def step(self) -> StepResult:
        """Deliver, refresh who crossed the threshold, commit atomically."""
        c = self.config
        entries = self.events.deliver(c.group, c.consumer, c.batch, c.block_ms, c.claim_idle_ms)
        if not entries:
            self.metrics.lag.labels(c.group).set(self.events.lag(c.group))
            return StepResult()
        fresh = Tally(e.event.user_id for e in entries if e.event is not None)
        before = self.events.pending_counts(c.group, list(fresh))
        due = [user for user, n in fresh.items() if before[user] + n >= c.min_events]
        refreshes, version = self._refresh({user: before[user] + fresh[user] for user in due})
        applied = self.events.commit(c.group, entries, refreshes, version or 0)
        trimmed = sum(e.event is None for e in entries)
        self.metrics.events.labels("applied").inc(applied - trimmed)
        self.metrics.events.labels("trimmed").inc(trimmed)
        self.metrics.refreshes.inc(len(refreshes))
        self.metrics.lag.labels(c.group).set(self.events.lag(c.group))
        return StepResult(len(entries), applied, len(refreshes))

    def run(self, should_stop: Callable[[], bool], on_step: Callable[[StepResult], None]) -> None:
        """Steps until ``should_stop()``; ``on_step`` sees each batch (progress logs).

        A Redis outage pauses the worker instead of ending it: a batch that was not committed
        is delivered again once Redis is back (its commit is atomic), so retrying is safe.
        """
        while not should_stop():
            try:
                on_step(self.step())
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("Redis unavailable (%s); retrying in %.1f s", exc, RETRY_S)
                time.sleep(RETRY_S)

    def _refresh(self, pending: dict[str, int]) -> tuple[list[Refresh], int | None]:
        """New preference texts for users with ``pending`` unread events each."""
        if not pending:
            return [], None
        histories, previous, version = [], {}, None
        for user_id, unread in pending.items():
            serving = self.events.serving_user(user_id)
            version = serving.version
            if serving.user is None or version is None:
                continue
            known, _ = self.catalog.known(serving.user.history)
            items = np.asarray(self.catalog.index_of(known), dtype=np.int64)
            ratings = np.full(len(items), np.nan, dtype=np.float32)
            histories.append(UserHistory(user_id, items, ratings))
            read = max(0, len(items) - unread)  # where the unread part of this history starts
            if serving.user.preference and read:
                previous[user_id] = PreferenceState(user_id, serving.user.preference, read)
        if not histories or version is None:
            return [], version
        start = time.perf_counter()
        states = summarise_users(histories, self.lines, self.generator, self.preference, previous)
        log.info("refreshed %d preference(s) in %.2f s", len(states), time.perf_counter() - start)
        return [Refresh(s.user_id, s.preference, s.watermark) for s in states], version
