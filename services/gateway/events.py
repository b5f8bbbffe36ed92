"""``POST /events``: validate each event on its own, record the good ones in one atomic write.

A bad field or an unknown item rejects that event with a reason; the rest of the batch goes in.
Accepted events go to ``feature_store.events.EventStore`` in one server-side script (idempotent
by ``event_id``), and the next ``/recommend`` of the user reads them through the live tail
(read-your-writes). When Redis does not answer the whole batch gets ``503`` with
``Retry-After``: the script either ran completely or not at all, and a retry of the same
event ids can only be counted as duplicates, never applied twice.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from feature_store.client import FeatureStoreUnavailable
from feature_store.events import EventStore
from feature_store.live import Event as StoredEvent
from services.common.errors import ServiceError, validation_detail
from services.common.metrics import GatewayMetrics
from services.common.settings import GatewaySettings
from services.gateway.schemas import Event, EventsRequest, EventsResponse, RejectedEvent
from services.gateway.wiring import redis_url
from tandem.data import Catalog

RETRY_AFTER_S = 1


class EventIngest:
    """The ``/events`` logic: per-event validation, catalog check, one atomic store call."""

    def __init__(self, store: EventStore, catalog: Catalog, metrics: GatewayMetrics):
        self.store = store
        self.catalog = catalog
        self.metrics = metrics

    async def __call__(self, request: EventsRequest) -> EventsResponse:
        start = time.perf_counter()
        valid, rejected = self._validated(request.events)
        try:
            ingested = await self.store.ingest([event for _, event in valid])
        except FeatureStoreUnavailable as exc:
            raise ServiceError(
                503,
                f"events not recorded, none of them ({exc}); retry the same batch: events "
                "already accepted are counted as duplicates, never applied twice",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from exc
        accepted = sum(ingested.accepted)
        duplicates = len(valid) - accepted
        self.metrics.events.labels("accepted").inc(accepted)
        self.metrics.events.labels("duplicate").inc(duplicates)
        self.metrics.events.labels("rejected").inc(len(rejected))
        self.metrics.events_stream_length.set(ingested.stream_length)
        self.metrics.events_ingest_duration.observe(time.perf_counter() - start)
        return EventsResponse(accepted=accepted, duplicates=duplicates, rejected=rejected)

    async def close(self) -> None:
        await self.store.close()

    def _validated(
        self, raw_events: Sequence[dict[str, Any]]
    ) -> tuple[list[tuple[int, StoredEvent]], list[RejectedEvent]]:
        """(index, event) of the events to record, and the rejected ones with reasons."""
        now = time.time()
        parsed: list[tuple[int, Event]] = []
        rejected: list[RejectedEvent] = []
        for index, raw in enumerate(raw_events):
            try:
                parsed.append((index, Event.model_validate(raw)))
            except ValidationError as exc:
                event_id = raw.get("event_id")
                rejected.append(
                    RejectedEvent(
                        index=index,
                        event_id=event_id if isinstance(event_id, str) else None,
                        detail=validation_detail(list(exc.errors())),
                    )
                )
        _, unknown = self.catalog.known([event.item_id for _, event in parsed])
        missing = set(unknown)
        valid = []
        for index, event in parsed:
            if event.item_id in missing:
                detail = f"item_id: unknown item {event.item_id!r} (not in the served catalog)"
                rejected.append(RejectedEvent(index=index, event_id=event.event_id, detail=detail))
                continue
            stored = StoredEvent(
                event_id=event.event_id,
                user_id=event.user_id,
                item_id=event.item_id,
                type=event.type,
                ts=now if event.ts is None else event.ts,
                request_id=event.request_id or "",
            )
            valid.append((index, stored))
        rejected.sort(key=lambda r: r.index)
        return valid, rejected


def build_events(
    settings: GatewaySettings, metrics: GatewayMetrics, catalog: Catalog
) -> EventIngest:
    """The service on the configured Redis (the same one, and namespace, as the features)."""
    store = EventStore(
        redis_url(settings),
        settings.namespace,
        deadline=settings.events_deadline_ms / 1000,
        stream_max=settings.events_stream_max,
        dedup_ttl_s=settings.events_dedup_ttl_s,
        tail_cap=settings.events_tail_cap,
    )
    return EventIngest(store, catalog, metrics)
