"""``tandem vllm``: start the ranker's vLLM server; export, hot-load and roll back LoRA adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tandem.console import console, fail

app = typer.Typer(
    help="The vLLM ranker server: launch it, and manage its versioned LoRA adapters (rec-v{n}).",
    no_args_is_help=True,
)
adapter_app = typer.Typer(
    help="Export, hot-load, roll back and list LoRA adapters (versioned rec-v{n}).",
    no_args_is_help=True,
)
app.add_typer(adapter_app, name="adapter")

VllmUrl = Annotated[
    str, typer.Option("--vllm-url", envvar="TANDEM_VLLM_URL", help="The vLLM OpenAI server.")
]
Store = Annotated[
    Path | None,
    typer.Option(help="Adapter store: immutable rec-v{n} folders. Default: artifacts/adapters."),
]
MaxRank = Annotated[int, typer.Option(help="The server's --max-lora-rank.")]


def _store(store: Path | None):
    from ranker.adapters import AdapterStore
    from tandem.paths import artifacts_root

    return AdapterStore(store or artifacts_root() / "adapters")


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def launch(ctx: typer.Context) -> None:
    """Start vLLM with the ranker's flags (--profile cpu|gpu, --model DIR, --lora-modules
    rec-v1=DIR, --print, ...; see --help); waits for health, warms up, runs until stopped."""
    try:
        from deploy.vllm.launch import main
    except ImportError:
        fail("deploy/vllm/launch.py is not importable here: run `python deploy/vllm/launch.py`")
    raise typer.Exit(main(list(ctx.args)))


@adapter_app.command("export")
def export(
    source: Annotated[Path, typer.Argument(help="A peft adapter folder, or a ranker run folder.")],
    store: Store = None,
    max_rank: MaxRank = 8,
) -> None:
    """Check a trained adapter fits the server and copy it into the next rec-v{n} version."""
    from ranker.adapters import AdapterError

    try:
        name, path, created = _store(store).export(source, max_rank)
    except (AdapterError, FileNotFoundError) as exc:
        fail(str(exc))
    state = "exported" if created else "already exported (same weights)"
    console.print(f"{name}: {state} at {path}")


@adapter_app.command("merge")
def merge(
    source: Annotated[Path, typer.Argument(help="A peft adapter folder, or a ranker run folder.")],
    out: Annotated[Path, typer.Option(help="New folder for the merged checkpoint.")],
    llm: Annotated[
        Path | None, typer.Option(help="Base checkpoint. Default: artifacts/llm.")
    ] = None,
    max_rank: MaxRank = 8,
) -> None:
    """Fold an adapter into the base weights: the fastest CPU serving (launch with --no-lora
    --served-model-name rec-v{n}); a new version then means a restart, not a hot load."""
    from ranker.adapters import AdapterError, merge_adapter
    from tandem.paths import artifacts_root

    try:
        with console.status(f"merging {source} into {llm or artifacts_root() / 'llm'}"):
            folder = merge_adapter(llm or artifacts_root() / "llm", source, out, max_rank)
    except (AdapterError, OSError) as exc:
        fail(str(exc))
    console.print(f"merged checkpoint at {folder}")


@adapter_app.command("load")
def load(
    source: Annotated[
        Path | None,
        typer.Argument(help="Adapter or ranker run to export first (omit with --name/--path)."),
    ] = None,
    vllm_url: VllmUrl = "http://127.0.0.1:8011",
    name: Annotated[
        str | None, typer.Option(help="Version to load an already exported adapter as.")
    ] = None,
    path: Annotated[
        str | None, typer.Option(help="With --name: the adapter folder as the server sees it.")
    ] = None,
    store: Store = None,
    server_store: Annotated[
        str | None,
        typer.Option(help="Where the server mounts the store (e.g. /adapters). Default: same."),
    ] = None,
    max_rank: MaxRank = 8,
) -> None:
    """Hot-load a new adapter version into a running server and smoke-test it."""
    from ranker.adapters import AdapterError, ServerAdapters, version_of

    if (source is None) == (name is None):
        fail("give either SOURCE (export, then load) or --name with --path (already exported)")
    if name is not None and path is None:
        fail("--name needs --path: the adapter folder as the vLLM server sees it")
    try:
        with ServerAdapters(vllm_url) as admin:
            loaded = admin.loaded()
            if source is not None:
                newest = (version_of(loaded[-1]) or 0) if loaded else 0  # oldest first
                adapters = _store(store)
                name, local, _ = adapters.export(source, max_rank, at_least=newest + 1)
                path = f"{server_store.rstrip('/')}/{name}" if server_store else str(local)
            assert name is not None and path is not None
            with console.status(f"loading {name} into {vllm_url}"):
                admin.load(name, path)
            serving = admin.loaded()
    except (AdapterError, FileNotFoundError) as exc:
        fail(str(exc))
    console.print(f"loaded {name} from {path}; serving {serving} (clients on 'auto' use {name})")


@adapter_app.command("rollback")
def rollback(vllm_url: VllmUrl = "http://127.0.0.1:8011") -> None:
    """Unload the newest adapter version; the previous one keeps serving."""
    from ranker.adapters import AdapterError, ServerAdapters

    try:
        with ServerAdapters(vllm_url) as admin:
            removed, current = admin.rollback()
    except AdapterError as exc:
        fail(str(exc))
    console.print(f"unloaded {removed}; now serving {current}")


@adapter_app.command("list")
def list_adapters(vllm_url: VllmUrl = "http://127.0.0.1:8011", store: Store = None) -> None:
    """Exported versions and which of them the server serves."""
    from ranker.adapters import AdapterError, ServerAdapters

    adapters = _store(store)
    try:
        with ServerAdapters(vllm_url) as admin:
            loaded = admin.loaded()
    except AdapterError as exc:
        console.print(f"[yellow]server not reachable:[/] {exc}")
        loaded = []
    table = Table(title=f"Adapters in {adapters.root}")
    for column in ("version", "served", "rank", "sha256", "source"):
        table.add_column(column)
    names = list(dict.fromkeys([*adapters.versions(), *loaded]))
    for name in names:
        meta = adapters.metadata(name) if name in adapters.versions() else {}
        served = "newest" if loaded and name == loaded[-1] else ("yes" if name in loaded else "")
        table.add_row(
            name,
            served,
            str(meta.get("rank", "")),
            str(meta.get("sha256", ""))[:12],
            str(meta.get("source", "(not in this store)")),
        )
    console.print(table)
