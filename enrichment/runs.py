"""The enrichment jobs end to end: inputs in, a run folder with a manifest out.

The CLI (``tandem enrich ...``) and the benchmarks call these; each writes
``artifacts/<dataset>/<kind>/<run-id>/`` with its outputs, a ``manifest.json`` (config, data
fingerprint, metrics, file hashes, parent runs) and marks it ``latest``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path

import numpy as np

from enrichment import captions as captions_mod
from enrichment import items as items_mod
from enrichment import preferences as prefs_mod
from enrichment.calibration import ProbeUsers
from enrichment.checkpoint import JsonlCheckpoint, read_jsonl
from enrichment.generation import Generator, GeneratorSpec
from retriever.cold_slots import ColdSlots
from tandem.artifacts import Manifest, mark_latest, new_run_id, resolve_run, runs_dir
from tandem.data import Catalog, Dataset

ProgressFn = Callable[[int], None]
PARTIAL_FILE = "preferences.partial.jsonl"  # the resumable checkpoint of an unfinished job


def training_item_counts(dataset: Dataset) -> np.ndarray:
    """Interactions per item index in the retriever's training part (leave-one-out prefixes)."""
    train = dataset.split().train
    flat = np.concatenate(train) if train else np.zeros(0, dtype=np.int64)
    return np.bincount(flat, minlength=dataset.catalog.num_items + 1)


def load_retriever_vectors(
    retriever_run: Path, dataset: Dataset, probes: int = 1024
) -> tuple[np.ndarray, ProbeUsers, Path]:
    """The retriever's item table ``[num_items + 1, d]``, up to ``probes`` validation users
    (vectors, targets, histories: they calibrate the cold items' vectors), and the run folder."""
    run_dir = resolve_run(retriever_run)
    from retriever.core import Retriever

    retriever = Retriever.load(run_dir)
    if list(retriever.catalog.item_ids) != list(dataset.catalog.item_ids):
        raise ValueError(
            f"the retriever in {run_dir} was trained on another catalog than this dataset: "
            "retrain it, or pass the matching --retriever-run"
        )
    embeddings = np.asarray(retriever.item_embeddings(), dtype=np.float32)
    split = dataset.split()
    inputs = split.valid_inputs()
    kept = [row for row, history in enumerate(inputs) if len(history)][:probes]
    histories = [inputs[row] for row in kept]
    users = np.asarray(retriever.user_vectors(histories), dtype=np.float32)
    return embeddings, ProbeUsers(users, split.valid_target[kept], histories), run_dir


def load_cold_slots(items_run: Path, retriever_run_id: str, slots: int) -> ColdSlots:
    """The cold items of an items run made for the retriever run ``retriever_run_id``, with
    their (calibrated) vectors, given ``slots`` exploration slots. ValueError if the run's
    files changed or it was made for another retriever (its cold vectors live in that
    retriever's item space); FileNotFoundError names what to run."""
    run_dir = resolve_run(items_run)
    manifest = Manifest.read(run_dir)
    if manifest.kind != items_mod.KIND:
        raise ValueError(f"{run_dir} is a {manifest.kind} run, not {items_mod.KIND}")
    manifest.check_files(run_dir)
    parent = Path(manifest.parents.get("retriever", "")).name
    if parent != retriever_run_id:
        raise ValueError(
            f"items run {run_dir.name} was made for retriever run {parent or '(none)'}, not "
            f"the served {retriever_run_id}: run `tandem enrich items` for the served retriever"
        )
    items = items_mod.ItemEmbeddings.load(run_dir / items_mod.EMBEDDINGS_FILE)
    cold = np.flatnonzero(items.cold)
    return ColdSlots(cold, items.retrieval_embeddings[cold], slots)


def _engine_session(engine: str, workers: int) -> contextlib.AbstractContextManager:
    """A Ray session for the Ray engine (reusing a running one), nothing for the local one."""
    if engine != "ray":
        return contextlib.nullcontext()
    from enrichment.ray_engine import ray_session

    return ray_session(workers)


def new_run_dir(root: Path, dataset: str, kind: str) -> Path:
    """A fresh run folder; run ids have one-second resolution, so a clash gets a suffix."""
    base = runs_dir(root, dataset, kind) / new_run_id(kind.removeprefix("enrichment-"))
    base.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(100):
        run_dir = base.with_name(f"{base.name}-{attempt}") if attempt else base
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a new run folder next to {base}")


def latest_captions(root: Path, dataset: str) -> tuple[dict[str, str], Path | None]:
    """Captions of the newest captions run, or nothing when none was made."""
    try:
        run_dir = resolve_run(runs_dir(root, dataset, captions_mod.KIND))
    except FileNotFoundError:
        return {}, None
    return captions_mod.read_captions(run_dir), run_dir


def run_items(
    dataset: Dataset,
    id_embeddings: np.ndarray,
    root: Path,
    *,
    captions: Mapping[str, str] | None = None,
    text_model: Path | None = None,
    image_model: Path | None = None,
    engine: str = "local",
    workers: int = 2,
    config: items_mod.ItemEnrichmentConfig = items_mod.ItemEnrichmentConfig(),
    parents: Mapping[str, str] | None = None,
    item_counts: np.ndarray | None = None,
    probes: ProbeUsers | None = None,
    on_encoded: ProgressFn | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[Path, items_mod.ItemEnrichmentResult, dict]:
    """Encode, align and save item embeddings; returns (run folder, result, metrics)."""
    from enrichment.towers import ImageTower, TextTower, minilm_path

    text_model = Path(text_model) if text_model is not None else minilm_path()
    counts = training_item_counts(dataset) if item_counts is None else item_counts
    start = time.perf_counter()
    if engine == "ray":
        from enrichment.ray_engine import RayImageEncoder, RayTextEncoder

        encode_texts = RayTextEncoder(text_model, config.text_batch_size, workers)
        encode_images = (
            RayImageEncoder(image_model, config.image_batch_size, workers) if image_model else None
        )
        chunk = None
    elif engine == "local":
        encode_texts = TextTower(text_model, config.text_batch_size).encode
        encode_images = (
            ImageTower(image_model, config.image_batch_size).encode if image_model else None
        )
        chunk = config.chunk_size
    else:
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
    with _engine_session(engine, workers):
        content = items_mod.encode_content(
            dataset.catalog, captions or {}, encode_texts, encode_images, chunk, on_encoded
        )
    encode_seconds = time.perf_counter() - start
    probe_users = probes.vectors if probes is not None else None
    result = items_mod.enrich_items(
        content, id_embeddings, counts, config, on_epoch, probe_users, probes
    )
    total_seconds = time.perf_counter() - start

    run_dir = new_run_dir(root, dataset.name, items_mod.KIND)
    result.items.save(run_dir / items_mod.EMBEDDINGS_FILE)
    items_mod.save_fusion(result.encoder, run_dir / items_mod.FUSION_FILE, result.id_scale)
    metrics = {
        **result.summary(),
        "image_paths": content.image_paths,
        "image_errors": content.image_errors,
        "encode_seconds": round(encode_seconds, 2),
        "items_per_second": round(dataset.catalog.num_items / encode_seconds, 2),
        "total_seconds": round(total_seconds, 2),
    }
    manifest = Manifest(
        kind=items_mod.KIND,
        run_id=run_dir.name,
        dataset=dataset.name,
        config={
            **asdict(config),
            "engine": engine,
            "workers": workers,
            "text_model": str(text_model),
            "image_model": str(image_model) if image_model else None,
            "modalities": list(items_mod.MODALITIES),
            "captions": len(captions or {}),
        },
        data_fingerprint=dataset.summary.fingerprint,
        metrics=metrics,
        parents=dict(parents or {}),
    )
    manifest.write(run_dir)
    mark_latest(run_dir)
    return run_dir, result, metrics


def run_captions(
    dataset: Dataset,
    root: Path,
    *,
    generator: Generator | None,
    generator_source: str,
    captioner: captions_mod.ImageCaptioner | None = None,
    config: captions_mod.CaptionConfig = captions_mod.CaptionConfig(),
    max_items: int | None = None,
    on_progress: ProgressFn | None = None,
) -> tuple[Path, captions_mod.CaptionStats, dict]:
    """Caption the catalog (through the dataset's shared cache) into a new run folder."""
    catalog = dataset.catalog
    if max_items is not None and max_items < catalog.num_items:
        catalog = Catalog(catalog.frame.iloc[:max_items].reset_index(drop=True))
    cache = captions_mod.CaptionCache(
        runs_dir(root, dataset.name, captions_mod.KIND) / captions_mod.CACHE_FILE
    )
    start = time.perf_counter()
    captions, stats = captions_mod.caption_items(
        catalog, cache, generator, generator_source, captioner, config, on_progress
    )
    seconds = time.perf_counter() - start
    run_dir = new_run_dir(root, dataset.name, captions_mod.KIND)
    with (run_dir / captions_mod.CAPTIONS_FILE).open("w", encoding="utf-8") as handle:
        for item_id in catalog.item_ids:
            if item_id in captions:
                record = {"item_id": item_id, "caption": captions[item_id]}
                handle.write(_json_line(record))
    generated = stats.from_image + stats.from_llm
    metrics = {
        "items": catalog.num_items,
        "captioned": len(captions),
        **asdict(stats),
        "seconds": round(seconds, 2),
        "generated_per_second": round(generated / seconds, 3) if generated and seconds else 0.0,
    }
    manifest = Manifest(
        kind=captions_mod.KIND,
        run_id=run_dir.name,
        dataset=dataset.name,
        config={
            **asdict(config),
            "llm": generator_source if generator is not None else None,
            "image_captioner": captioner.source if captioner is not None else None,
            "prompt_version": captions_mod.PROMPT_VERSION,
            "max_items": max_items,
        },
        data_fingerprint=dataset.summary.fingerprint,
        metrics=metrics,
    )
    manifest.write(run_dir)
    mark_latest(run_dir)
    return run_dir, stats, metrics


def _json_line(record: Mapping) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def read_preferences(path: Path) -> dict[str, prefs_mod.PreferenceState]:
    """Stored states from a preferences JSONL file or a preferences run folder."""
    path = Path(path)
    if path.is_dir():
        path = resolve_run(path) / prefs_mod.PREFERENCES_FILE
    return {
        s.user_id: s for s in (prefs_mod.PreferenceState.from_record(r) for r in read_jsonl(path))
    }


def run_preferences(
    dataset: Dataset,
    root: Path,
    spec: GeneratorSpec,
    *,
    config: prefs_mod.PreferenceConfig = prefs_mod.PreferenceConfig(),
    max_users: int | None = None,
    engine: str = "local",
    workers: int = 2,
    checkpoint_every: int = 32,
    resume: Path | None = None,
    since: Path | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_progress: ProgressFn | None = None,
) -> tuple[Path, prefs_mod.JobStats, dict]:
    """Summarise users into ``preferences.jsonl`` (resumable), then write the manifest.

    ``resume``: an unfinished run folder of the same job to continue. ``since``: an earlier
    preferences run; its summaries are updated with interactions after their watermarks
    (users it lacks are summarised from scratch, and its other users are carried over).
    """
    histories = prefs_mod.user_histories(dataset, config.history)
    if max_users is not None:
        histories = histories[:max_users]
    previous = read_preferences(since) if since is not None else {}
    job_config = {
        **asdict(config),
        "generator": asdict(spec),
        "max_users": max_users,
        "since": str(since) if since else None,
        "data_fingerprint": dataset.summary.fingerprint,
    }
    if resume is not None:
        run_dir = Path(resume)
        if (run_dir / "manifest.json").is_file():
            raise ValueError(f"{run_dir} is a finished run: nothing to resume")
        if not (run_dir / PARTIAL_FILE).is_file():
            raise FileNotFoundError(f"{run_dir} holds no unfinished job ({PARTIAL_FILE})")
    else:
        run_dir = new_run_dir(root, dataset.name, prefs_mod.KIND)
    checkpoint = JsonlCheckpoint(run_dir / PARTIAL_FILE, "user_id", job_config)
    if on_start is not None:
        on_start(len(histories), sum(1 for h in histories if h.user_id in checkpoint))
    with _engine_session(engine, workers):
        stats = prefs_mod.run_preferences(
            histories,
            prefs_mod.item_lines(dataset.catalog),
            spec,
            config,
            checkpoint,
            previous=previous,
            chunk_users=checkpoint_every,
            engine=engine,
            workers=workers,
            on_progress=on_progress,
        )
    carried = [s.to_record() for uid, s in previous.items() if uid not in checkpoint]
    checkpoint.write(carried)
    # the output holds only users with a text: the feature store rejects empty preferences
    kept = [r for r in checkpoint.done.values() if r["preference"]]
    with (run_dir / prefs_mod.PREFERENCES_FILE).open("w", encoding="utf-8") as handle:
        handle.writelines(_json_line(r) for r in kept)
    checkpoint.finish()
    (run_dir / PARTIAL_FILE).unlink()
    metrics = {
        **stats.as_metrics(),
        "users_total": len(checkpoint.done),
        "carried_over": len(carried),
        "with_preference": len(kept),
    }
    parents = {"since": str(since)} if since else {}
    manifest = Manifest(
        kind=prefs_mod.KIND,
        run_id=run_dir.name,
        dataset=dataset.name,
        config=job_config,
        data_fingerprint=dataset.summary.fingerprint,
        metrics=metrics,
        parents=parents,
    )
    manifest.write(run_dir)
    mark_latest(run_dir)
    return run_dir, stats, metrics
