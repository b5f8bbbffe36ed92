"""``--publish``: one complete feature version with the newest enrichment outputs.

A feature-store version is complete by design (users and items together, then one atomic
alias swap), so publishing after one enrichment job also carries the newest outputs of the
other two: the item embeddings, captions and preferences that serving should see together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from enrichment import captions as captions_mod
from enrichment import items as items_mod
from enrichment import preferences as prefs_mod
from tandem.artifacts import resolve_run, runs_dir
from tandem.data import Dataset


@dataclass(frozen=True)
class Published:
    version: int
    manifest_id: str
    users: int
    items: int
    files: dict[str, str]


def _latest_file(root: Path, dataset: str, kind: str, name: str, run: Path | None) -> Path | None:
    try:
        run_dir = resolve_run(run or runs_dir(root, dataset, kind))
    except FileNotFoundError:
        if run is not None:
            raise
        return None
    path = run_dir / name
    return path if path.is_file() else None


def publish_enrichment(
    dataset: Dataset,
    root: Path,
    redis_url: str,
    namespace: str = "default",
    *,
    items_run: Path | None = None,
    preferences_run: Path | None = None,
    captions_run: Path | None = None,
    embedding_dtype: str = "float16",
) -> Published:
    """Publish the dataset's users and items with the given (else newest) enrichment runs."""
    from feature_store.dataset import publish_sources
    from feature_store.writer import FeatureWriter

    files = {
        "embeddings": _latest_file(
            root, dataset.name, items_mod.KIND, items_mod.EMBEDDINGS_FILE, items_run
        ),
        "preferences": _latest_file(
            root, dataset.name, prefs_mod.KIND, prefs_mod.PREFERENCES_FILE, preferences_run
        ),
        "captions": _latest_file(
            root, dataset.name, captions_mod.KIND, captions_mod.CAPTIONS_FILE, captions_run
        ),
    }
    writer = FeatureWriter(redis_url, namespace)
    try:
        version, sources = publish_sources(
            writer,
            dataset,
            embeddings_path=files["embeddings"],
            preferences_path=files["preferences"],
            captions_path=files["captions"],
            embedding_dtype=embedding_dtype,
        )
    finally:
        writer.close()
    return Published(
        version=version,
        manifest_id=sources.manifest_id,
        users=len(sources.users),
        items=len(sources.items),
        files={k: str(v) for k, v in files.items() if v is not None},
    )
