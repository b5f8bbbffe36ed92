"""``HeadRanker``: stage 2 as a listwise linear head on the candidates' signal rows, no LLM.

The LLM ranker reads one signal row per candidate (``ranker.signals``: retriever score and
rank, side features, item-item cosines, recent popularity, co-visitation). A linear head on
exactly those rows, trained listwise as a residual on the retriever's log-softmax, is the
first stage 2 that beat retriever order on this data (``benchmarks/ranker_headroom.py``): it
finds what the sequence model leaves out, at a cost of microseconds, where the LLM trained on
the same rows has not yet left its teacher. So it is a ranker of its own, served through the
same stages, fusion and weight tuning as the LLM, and shipped the same way.

Its "prompt" is the signal rows themselves, carried as a ``RenderedPrompt`` with one soft slot
per candidate and no text: the gateway's prompt stage renders it off the event loop and the
ranker stage scores it through ``HeadBackend`` like any other backend. The head's score is
``rows @ weight / scale``: fused at weight 0.5 (``ranker.fusion``) that is exactly the trained
``scale * log_softmax(retriever) + rows @ weight`` up to a constant.

A run folder holds ``head.safetensors`` instead of an adapter and projectors, beside the usual
``ranker.json``, item table and run tables (``ranker.core``, ``ranker.run_tables``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ranker.backends.base import RenderedPrompt
from ranker.core import CONFIG_FILE, ITEM_IDS, ItemTable, RankerConfig, with_run_features
from ranker.fusion import log_softmax
from ranker.prompts import PromptInput, signal_rows
from ranker.run_tables import RunTables

HEAD_FILE = "head.safetensors"


@dataclass(frozen=True)
class LinearHead:
    """``rows @ weight + bias`` per candidate, and the retriever scale it was trained beside."""

    weight: np.ndarray  # [signal_dim]
    bias: float = 0.0  # the same for every candidate: kept for completeness, never changes order
    scale: float = 1.0  # the learned weight of the retriever's log-softmax in training

    def scores(self, rows: np.ndarray) -> np.ndarray:
        """The ranker's per-candidate score (the residual over the scaled retriever)."""
        if rows.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"signal rows of {rows.shape[-1]} columns, head of {len(self.weight)}")
        return (rows @ self.weight + self.bias) / max(self.scale, 1e-3)

    def save(self, path: Path) -> None:
        from safetensors.numpy import save_file

        meta = {"bias": repr(float(self.bias)), "scale": repr(float(self.scale))}
        save_file({"weight": self.weight.astype(np.float32)}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> LinearHead:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as handle:
            meta = handle.metadata() or {}
            weight = handle.get_tensor("weight").astype(np.float32)
        return cls(weight, float(meta.get("bias", 0.0)), float(meta.get("scale", 1.0)))


class HeadBackend:
    """The ``RankerBackend`` of a head: in-process numpy, ready as soon as it is built."""

    name = "head"

    def __init__(self, head: LinearHead):
        self.head = head

    async def start(self) -> None:
        """Nothing to load: the weights came with the constructor."""

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        """Nothing to release."""

    def score_sync(self, prompts: Sequence[RenderedPrompt]) -> list[np.ndarray]:
        return [log_softmax(self.head.scores(p.soft_vectors)).astype(np.float32) for p in prompts]

    async def score(
        self,
        prompts: Sequence[RenderedPrompt],
        *,
        request_id: str | None = None,
        deadline_s: float | None = None,
    ) -> list[np.ndarray]:
        """Microseconds of numpy: no deadline to enforce, nothing to forward the id to."""
        return self.score_sync(prompts)


def feature_prompt(rows: np.ndarray) -> RenderedPrompt:
    """Signal rows as a prompt: one soft slot per candidate, no text, no tokens to read."""
    slots = tuple(range(len(rows)))
    return RenderedPrompt(
        token_ids=(0,) * len(rows),
        letter_token_ids=slots,
        soft_positions=slots,
        soft_vectors=np.asarray(rows, dtype=np.float32),
    )


class HeadRanker:
    """Renders signal rows and scores them with a ``LinearHead`` (the ``Ranker`` interface the
    gateway and the evaluation use: ``config``, ``item_table``, ``render_all``, ``backend``)."""

    def __init__(
        self,
        config: RankerConfig,
        head: LinearHead,
        item_table: ItemTable,
        tables: RunTables = RunTables(),
    ):
        if not config.prompt.candidate_signals:
            raise ValueError("a head ranker reads candidate signal rows: use the pointer prompt")
        self.config = config
        self.backend = HeadBackend(head)
        self.item_table = item_table
        self.tables = tables

    @classmethod
    def load(cls, run_dir: Path) -> HeadRanker:
        if not (run_dir / ITEM_IDS).is_file():
            raise FileNotFoundError(f"{run_dir} has a head but no item table ({ITEM_IDS})")
        return cls(
            RankerConfig.from_json((run_dir / CONFIG_FILE).read_text()),
            LinearHead.load(run_dir / HEAD_FILE),
            ItemTable.load(run_dir),
            RunTables.load(run_dir),
        )

    def rows(self, inp: PromptInput) -> np.ndarray:
        """The candidates' signal rows, from the run's own item table and tables."""
        inp = with_run_features(inp, self.item_table, self.tables)
        return signal_rows(inp, self.config.prompt)

    def render_all(self, inp: PromptInput) -> tuple[list[RenderedPrompt], np.ndarray]:
        """One prompt in the given order: a linear head has no position bias to average."""
        return [feature_prompt(self.rows(inp))], np.arange(len(inp.candidates))[None, :]


def is_head_run(run_dir: Path | None) -> bool:
    return run_dir is not None and (run_dir / HEAD_FILE).is_file()
