"""Event-loop lag: how late a timer due now actually runs.

Anything CPU-bound or blocking on the loop (tokenising, projecting, serialising) delays every
request the process is serving; this makes it visible as a histogram instead of a mystery p99.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from prometheus_client import Histogram

INTERVAL_S = 0.05


async def watch_lag(histogram: Histogram, interval_s: float = INTERVAL_S) -> None:
    """Observe, forever, how much later than asked each short sleep returns."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.sleep(interval_s)
        histogram.observe(max(loop.time() - started - interval_s, 0.0))


@contextlib.asynccontextmanager
async def lag_watcher(histogram: Histogram) -> AsyncIterator[None]:
    """Run ``watch_lag`` for the lifetime of the context (the app's lifespan)."""
    task = asyncio.create_task(watch_lag(histogram), name="event-loop-lag")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
