"""What the service stack serves in tests and benchmarks: published features, a tiny ranker run."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ITEM_DIM = 16  # item embeddings published in the test feature store


def item_embeddings(item_ids: Sequence[str], dim: int = ITEM_DIM, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((len(item_ids), dim)).astype(np.float32)


def publish_dataset(url: str, namespace: str, dataset, *, manifest_id: str = "test") -> int:
    """Publish every user (full history, a preference for even users, the dataset's profile
    when it has one) and item (+embedding)."""
    from feature_store.dataset import profile_fields
    from feature_store.schema import ItemRecord, UserRecord
    from feature_store.writer import FeatureWriter

    catalog = dataset.catalog
    ids = catalog.item_ids
    vectors = item_embeddings(ids)
    items = [
        ItemRecord(item_id, catalog.title_of(n + 1), caption=f"caption {n}", embedding=vectors[n])
        for n, item_id in enumerate(ids)
    ]
    users = [
        UserRecord(
            user_id,
            tuple(catalog.id_of(sequence.tolist())),
            preference="Enjoys long dramas." if n % 2 == 0 else None,
            watermark=len(sequence),
            **profile_fields(dataset.profile(user_id)),
        )
        for n, (user_id, sequence) in enumerate(
            zip(dataset.interactions.user_ids, dataset.interactions.sequences(), strict=True)
        )
    ]
    writer = FeatureWriter(url, namespace)
    try:
        return writer.publish(users, items, manifest_id=manifest_id, embedding_dim=ITEM_DIM,
                              progress=False)  # fmt: skip
    finally:
        writer.close()


def make_tiny_ranker_run(
    folder: Path, llm_dir: Path, lora_dir: Path, *, item_dim: int, user_dim: int, dataset: str
) -> Path:
    """A ranker run on the tiny LLM with every prompt part on: LoRA, item and user soft tokens."""
    import json

    import torch

    from ranker.core import ADAPTER_DIR, CONFIG_FILE, ITEM_PROJECTOR, USER_PROJECTOR, RankerConfig
    from ranker.projector import Projector, ProjectorConfig
    from ranker.prompts import PromptConfig
    from tandem.artifacts import Manifest, mark_latest

    folder.mkdir(parents=True, exist_ok=True)
    hidden = json.loads((llm_dir / "config.json").read_text())["hidden_size"]
    config = RankerConfig(prompt=PromptConfig(item_soft_tokens=True, user_soft_token=True))
    (folder / CONFIG_FILE).write_text(config.to_json())
    torch.manual_seed(0)
    Projector(ProjectorConfig(in_dim=item_dim, out_dim=hidden)).save(folder / ITEM_PROJECTOR)
    Projector(ProjectorConfig(in_dim=user_dim, out_dim=hidden)).save(folder / USER_PROJECTOR)
    shutil.copytree(lora_dir, folder / ADAPTER_DIR, dirs_exist_ok=True)
    Manifest(
        kind="ranker", run_id=folder.name, dataset=dataset, config={"test": True},
        data_fingerprint="test", metrics={"rank_weight": 0.5},  # as if validation tuned it
    ).write(folder)  # fmt: skip
    mark_latest(folder)
    return folder
