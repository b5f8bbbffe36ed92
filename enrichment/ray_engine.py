"""``--engine ray``: item encoding and preference extraction as Ray Data pipelines.

Each worker is an actor that loads its model once (text tower, image tower or LLM) and maps
batches; the driver keeps the job's state (checkpoint, ordering). On a laptop this is a local
Ray instance with one worker per core; pointed at a cluster (``RAY_ADDRESS``) the same code
spreads over its nodes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from enrichment.generation import GeneratorSpec
from enrichment.preferences import PreferenceConfig, PreferenceState, UserHistory, summarise_users


@contextlib.contextmanager
def ray_session(workers: int) -> Iterator[None]:
    """Use the running Ray instance, or start a local one with ``workers`` CPUs (and stop it)."""
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(
        num_cpus=None if os.environ.get("RAY_ADDRESS") else workers,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    try:
        yield
    finally:
        ray.shutdown()


def _quiet_data_context() -> None:
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


class _TextActor:
    def __init__(self, model_path: str, batch_size: int):
        from enrichment.towers import TextTower

        self.tower = TextTower(model_path, batch_size=batch_size).load()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        vectors = self.tower.encode(batch["text"].tolist())
        return pd.DataFrame({"row": batch["row"].to_numpy(), "vector": list(vectors)})


class _ImageActor:
    def __init__(self, checkpoint: str, batch_size: int):
        from enrichment.towers import ImageTower

        self.tower = ImageTower(checkpoint, batch_size=batch_size).load()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        vectors, ok = self.tower.encode(batch["path"].tolist())
        return pd.DataFrame({"row": batch["row"].to_numpy(), "vector": list(vectors), "ok": ok})


def _map_rows(rows: list[dict], actor: type, kwargs: dict, batch_size: int, workers: int):
    import ray.data

    _quiet_data_context()
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 4 * workers)))
    mapped = dataset.map_batches(
        actor,
        fn_constructor_kwargs=kwargs,
        batch_size=batch_size,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=1,
    )
    frame = mapped.to_pandas().sort_values("row")
    if len(frame) != len(rows):
        raise RuntimeError(f"Ray returned {len(frame)} of {len(rows)} rows")
    return frame


class RayTextEncoder:
    """A ``TextEncodeFn`` that spreads the texts over ``workers`` text-tower actors."""

    def __init__(self, model_path: str, batch_size: int = 64, workers: int = 2):
        self.model_path, self.batch_size, self.workers = str(model_path), batch_size, workers

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        rows = [{"row": i, "text": t} for i, t in enumerate(texts)]
        frame = _map_rows(
            rows,
            _TextActor,
            {"model_path": self.model_path, "batch_size": self.batch_size},
            self._per_call(len(rows)),
            self.workers,
        )
        return np.stack(frame["vector"].to_list()).astype(np.float32)

    def _per_call(self, n: int) -> int:
        return max(1, min(4 * self.batch_size, -(-n // self.workers)))


class RayImageEncoder(RayTextEncoder):
    """An ``ImageEncodeFn`` over ``workers`` image-tower actors."""

    def __call__(self, paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[override]
        rows = [{"row": i, "path": p} for i, p in enumerate(paths)]
        frame = _map_rows(
            rows,
            _ImageActor,
            {"checkpoint": self.model_path, "batch_size": self.batch_size},
            self._per_call(len(rows)),
            self.workers,
        )
        ok = frame["ok"].to_numpy(dtype=bool)
        dim = next((len(v) for v, good in zip(frame["vector"], ok, strict=True) if good), 0)
        vectors = np.zeros((len(frame), dim), dtype=np.float32)
        for i, (vector, good) in enumerate(zip(frame["vector"], ok, strict=True)):
            if good:
                vectors[i] = vector
        return vectors, ok


class _PreferenceActor:
    def __init__(self, spec: GeneratorSpec, lines: list[str], config: PreferenceConfig):
        self.generator = spec.build()
        self.lines = lines
        self.config = config

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        histories, previous = [], {}
        for row in batch.itertuples(index=False):
            histories.append(
                UserHistory(
                    row.user_id,
                    np.asarray(row.items, dtype=np.int64),
                    np.asarray(row.ratings, dtype=np.float32),
                )
            )
            if row.watermark >= 0:
                previous[row.user_id] = PreferenceState(row.user_id, row.preference, row.watermark)
        before = self.generator.completion_tokens
        states = summarise_users(histories, self.lines, self.generator, self.config, previous)
        tokens = self.generator.completion_tokens - before
        return pd.DataFrame(
            {
                "user_id": [s.user_id for s in states],
                "preference": [s.preference for s in states],
                "watermark": [s.watermark for s in states],
                "tokens": [tokens] + [0] * (len(states) - 1),
            }
        )


def summarise_users_ray(
    pending: Sequence[UserHistory],
    lines: Sequence[str],
    spec: GeneratorSpec,
    config: PreferenceConfig,
    previous: Mapping[str, PreferenceState],
    chunk_users: int,
    workers: int,
) -> Iterator[tuple[list[PreferenceState], int]]:
    """Yield (states, generated tokens) per finished chunk of users, as workers finish them."""
    import ray.data

    _quiet_data_context()
    rows = []
    for history in pending:
        state = previous.get(history.user_id)
        rows.append(
            {
                "user_id": history.user_id,
                "items": history.items.tolist(),
                "ratings": history.ratings.tolist(),
                "preference": state.preference if state else "",
                "watermark": state.watermark if state else -1,
            }
        )
    blocks = max(1, -(-len(rows) // chunk_users))
    mapped = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
        _PreferenceActor,
        fn_constructor_kwargs={"spec": spec, "lines": list(lines), "config": config},
        batch_size=chunk_users,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=1,
    )
    for frame in mapped.iter_batches(batch_size=None, batch_format="pandas"):
        states = [
            PreferenceState(str(u), str(p), int(w))
            for u, p, w in zip(
                frame["user_id"], frame["preference"], frame["watermark"], strict=True
            )
        ]
        yield states, int(frame["tokens"].sum())
