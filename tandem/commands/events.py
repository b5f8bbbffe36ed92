"""``tandem events``: the live-events stream for offline jobs (export for retraining, follow)."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Annotated

import typer

from tandem.commands.enrich import LlmOpt, LlmUrlOpt, _generator_spec, _load_dataset
from tandem.commands.features import Namespace, RedisUrl
from tandem.console import console, fail

app = typer.Typer(
    help="The events stream POST /events writes: export it, or follow it to refresh preferences.",
    no_args_is_help=True,
)
log = logging.getLogger("tandem.events")


def _event_log(redis_url: str | None, namespace: str):
    from feature_store.embedded import redis_url_from_env_or_embedded
    from feature_store.event_log import EventLog
    from tandem.paths import artifacts_root

    try:
        return EventLog(redis_url or redis_url_from_env_or_embedded(artifacts_root()), namespace)
    except ValueError as exc:
        fail(str(exc))


@app.command()
def export(
    out: Annotated[Path, typer.Argument(help="Interactions file to write: .csv or .parquet.")],
    namespace: Namespace = "default",
    redis_url: RedisUrl = None,
    since: Annotated[
        str, typer.Option(help="Export entries after this stream id (exclusive).")
    ] = "0-0",
) -> None:
    """Write the stream as interactions (user_id,item_id,timestamp + event columns), the format
    `tandem data prepare --interactions` reads."""
    import pandas as pd
    import redis

    if out.suffix.lower() not in (".csv", ".parquet"):
        fail(f"{out}: use a .csv or .parquet file name")
    events = _event_log(redis_url, namespace)
    try:
        rows = [
            {
                "user_id": e.event.user_id,
                "item_id": e.event.item_id,
                "timestamp": int(e.event.ts),
                "event_id": e.event.event_id,
                "type": e.event.type,
                "request_id": e.event.request_id,
                "stream_id": e.stream_id,
            }
            for e in events.entries(start=f"({since}")
            if e.event is not None
        ]
    except redis.RedisError as exc:
        fail(f"Redis error ({type(exc).__name__}): {exc}")
    finally:
        events.close()
    columns = ["user_id", "item_id", "timestamp", "event_id", "type", "request_id", "stream_id"]
    frame = pd.DataFrame(rows, columns=columns)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".csv":
        frame.to_csv(out, index=False)
    else:
        frame.to_parquet(out, index=False)
    last = rows[-1]["stream_id"] if rows else since
    console.print(f"wrote {len(rows)} events to {out} (stream ids up to {last})")
    if rows:
        console.print(
            "A feature version built from this file includes these events: publish it with "
            f"`tandem features publish --events-through {last}` so they are not joined twice."
        )


@app.command()
def follow(
    dataset: Annotated[str, typer.Option(help="Prepared dataset (the served catalog).")] = (
        "ml-100k"
    ),
    llm: LlmOpt = None,
    llm_url: LlmUrlOpt = None,
    min_events: Annotated[int, typer.Option(min=1, help="New events that trigger a refresh.")] = 5,
    batch: Annotated[int, typer.Option(min=1, help="Stream entries per atomic commit.")] = 100,
    group: Annotated[str, typer.Option(help="Consumer group.")] = "preferences",
    consumer: Annotated[
        str, typer.Option(help="This worker's name: keep it across restarts.")
    ] = "follower-1",
    max_new_tokens: Annotated[int, typer.Option(min=8, help="Generated tokens per step.")] = 96,
    threads: Annotated[int | None, typer.Option(min=1, help="In-process torch threads.")] = None,
    metrics_port: Annotated[
        int, typer.Option(min=0, help="Serve Prometheus metrics on this port (0 = off).")
    ] = 0,
    exit_when_idle: Annotated[
        bool, typer.Option(help="Stop once nothing is pending (batch jobs and tests).")
    ] = False,
    namespace: Namespace = "default",
    redis_url: RedisUrl = None,
) -> None:
    """Refresh the preference text of users with >= N new events (incremental CoT-Rec).

    Each batch is acknowledged in the same atomic step that stores its refreshes: kill it at
    any point and restart it with the same --consumer; nothing is lost or applied twice.
    """
    import redis
    from prometheus_client import start_http_server

    from enrichment.follow import FollowConfig, PreferenceFollower, StepResult
    from enrichment.generation import GenerationError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    data = _load_dataset(dataset)
    spec = _generator_spec(llm, llm_url, max_new_tokens=max_new_tokens, threads=threads)
    config = FollowConfig(group=group, consumer=consumer, min_events=min_events, batch=batch)
    events = _event_log(redis_url, namespace)
    stopping = {"now": False}

    def stop(signum: int, _frame: object) -> None:
        log.info("signal %d: finishing the current batch, then stopping", signum)
        stopping["now"] = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    totals = StepResult()
    started = time.monotonic()

    def on_step(step: StepResult) -> None:
        totals.delivered += step.delivered
        totals.applied += step.applied
        totals.refreshed += step.refreshed
        if step.delivered:
            rate = totals.applied / max(time.monotonic() - started, 1e-9)
            log.info(
                "batch: %d entries, %d applied, %d refreshed | total %d applied (%.1f/s), "
                "%d refreshed, lag %d",
                step.delivered, step.applied, step.refreshed, totals.applied, rate,
                totals.refreshed, events.lag(group),
            )  # fmt: skip
        elif exit_when_idle and events.lag(group) == 0:
            stopping["now"] = True

    try:
        if metrics_port:
            start_http_server(metrics_port, addr="127.0.0.1")
        follower = PreferenceFollower(events, data.catalog, spec.build(), config)
        follower.run(lambda: stopping["now"], on_step)
    except (GenerationError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    except redis.RedisError as exc:
        fail(f"Redis error ({type(exc).__name__}): {exc}")
    finally:
        events.close()
    console.print(f"followed {totals.applied} events, refreshed {totals.refreshed} preference(s)")
