"""``tandem variants``: the ranker variants' traffic split in Redis: show, promote, roll back.

Gateways re-read the split every TANDEM_VARIANTS_POLL_S (1 s by default), so a change here
reaches every running gateway within seconds, without a restart. Variants themselves (runs,
adapters, weights) are configured on the gateways (TANDEM_VARIANTS); adapters get onto the vLLM
server with ``tandem vllm adapter load``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from tandem.commands.features import RedisUrl
from tandem.console import console, fail

if TYPE_CHECKING:
    from feature_store.splits import Split, SplitStore

app = typer.Typer(
    help="Ranker variants: show the active traffic split, promote a variant, roll back.",
    no_args_is_help=True,
)

Namespace = Annotated[
    str, typer.Option(envvar="TANDEM_NAMESPACE", help="The gateways' feature-store namespace.")
]


@contextmanager
def _store(url: str | None, namespace: str) -> Iterator[SplitStore]:
    """The namespace's split store; Redis and split errors become a clean CLI error."""
    import redis

    from feature_store.embedded import redis_url_from_env_or_embedded
    from feature_store.splits import SplitError, SplitStore
    from tandem.paths import artifacts_root

    try:
        resolved = url or redis_url_from_env_or_embedded(artifacts_root())
        store = SplitStore.connect(resolved, namespace, timeout_s=5.0)
    except (ValueError, redis.RedisError) as exc:
        fail(str(exc))
    try:
        yield store
    except SplitError as exc:
        fail(str(exc))
    except redis.RedisError as exc:
        fail(f"Redis error ({type(exc).__name__}): {exc}")
    finally:
        store.close()


def _print_split(split: Split, title: str) -> None:
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(split.activated_at))
    table = Table(title=f"{title}: v{split.version}, salt {split.salt!r}, since {when}")
    for column in ("variant", "share", "role", "adapter"):
        table.add_column(column)
    for v in split.variants:
        role = "control" if v.name == split.control else ("shadow" if v.shadow else "")
        table.add_row(v.name, f"{v.share:.1%}", role, v.adapter or "")
    console.print(table)
    console.print(f"why: {split.reason or '-'}")


@app.command()
def show(redis_url: RedisUrl = None, namespace: Namespace = "default") -> None:
    """The split every gateway of the namespace serves, and the ones a rollback walks back to."""
    with _store(redis_url, namespace) as store:
        doc = store.read()
    if doc is None:
        fail(f"no split in namespace {namespace!r}: start a gateway with TANDEM_VARIANTS set")
    _print_split(doc.active, "Active split")
    if doc.history:
        older = ", ".join(f"v{s.version} ({s.reason or '-'})" for s in doc.history)
        console.print(f"rollback walks back through: {older}")


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="The variant to serve to 100% of users.")],
    redis_url: RedisUrl = None,
    namespace: Namespace = "default",
    vllm_url: Annotated[
        str | None,
        typer.Option(
            envvar="TANDEM_VLLM_URL",
            help="The vLLM server, to check first that it serves the variant's adapter.",
        ),
    ] = None,
) -> None:
    """Make NAME the control at 100% of traffic (the previous split stays for rollback)."""
    with _store(redis_url, namespace) as store:
        doc = store.read()
        if doc is None:
            fail(f"no split in namespace {namespace!r}: start a gateway with TANDEM_VARIANTS set")
        adapter = doc.active.variant(name).adapter
        if adapter is not None and vllm_url:
            _check_served(adapter, vllm_url)
        split = store.promote(name)
    _print_split(split, "Promoted")


@app.command()
def rollback(redis_url: RedisUrl = None, namespace: Namespace = "default") -> None:
    """Restore the split before the last change (as a new version, so gateways follow it)."""
    with _store(redis_url, namespace) as store:
        split = store.rollback()
    _print_split(split, "Rolled back")


def _check_served(adapter: str, vllm_url: str) -> None:
    """Refuse to send all traffic to an adapter the vLLM server does not serve."""
    from ranker.adapters import AdapterError, ServerAdapters

    try:
        with ServerAdapters(vllm_url) as admin:
            served = admin.loaded()
    except AdapterError as exc:
        fail(f"cannot check that {vllm_url} serves {adapter}: {exc}")
    if adapter not in served:
        fail(
            f"the vLLM server at {vllm_url} does not serve {adapter} (it serves {served}): "
            f"load it first with `tandem vllm adapter load`"
        )


@app.command()
def report(
    redis_url: RedisUrl = None,
    namespace: Namespace = "default",
    control: Annotated[
        str | None,
        typer.Option(help="The variant to test against. Default: the active split's control."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Per variant: answers, attributed clicks, click-through rate (Wilson 95% interval), MRR
    of the clicked items, and a two-proportion test against the control.

    A click is an event (POST /events) whose request_id names an answer of the last 24 h and
    whose item was in it; the counters are cumulative since the namespace's first answer."""
    import json
    import math

    from feature_store.attribution import read_counts
    from services.gateway.attribution import figures

    with _store(redis_url, namespace) as store:
        doc = store.read()
        counts = read_counts(store.client, namespace)
    control = control or (doc.active.control if doc is not None else None)
    rows = figures(counts, control)
    if not rows:
        fail(f"no answers recorded in namespace {namespace!r} yet")

    def number(value: float) -> float | None:
        return None if math.isnan(value) else value

    if as_json:
        payload = [
            {
                "variant": r.counts.variant,
                "control": r.counts.variant == control,
                "requests": r.counts.requests,
                "clicked_requests": r.counts.clicked_requests,
                "clicks": r.counts.clicks,
                "ctr": number(r.ctr),
                "ctr_95": [number(r.ctr_low), number(r.ctr_high)],
                "mrr": r.mrr,
                "ctr_difference": number(r.ctr_difference),
                "p_value": number(r.p_value),
                "clicks_by_rank": r.counts.clicks_by_rank,
            }
            for r in rows
        ]
        console.print_json(json.dumps(payload))
        return
    table = Table(title=f"Variants in namespace {namespace!r} (control: {control or 'none'})")
    for column in ("variant", "answers", "clicked", "CTR [95%]", "clicks", "MRR", "Δ CTR", "p"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for r in rows:
        c = r.counts
        table.add_row(
            c.variant + (" (control)" if c.variant == control else ""),
            str(c.requests),
            str(c.clicked_requests),
            f"{r.ctr:.2%} [{r.ctr_low:.2%}, {r.ctr_high:.2%}]" if c.requests else "-",
            str(c.clicks),
            f"{r.mrr:.3f}",
            "-" if math.isnan(r.ctr_difference) else f"{r.ctr_difference:+.2%}",
            "-" if math.isnan(r.p_value) else f"{r.p_value:.3g}",
        )
    console.print(table)
