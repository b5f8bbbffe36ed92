"""``Ranker``: what serving uses to turn a ``PromptInput`` into one score per candidate.

It owns the tokenizer, the prompt switches, the projectors and the verbalizer's permutation
policy, and delegates the forward pass to a ``RankerBackend`` (in-process transformers, or the
vLLM server). A trained run folder holds everything except the base LLM:

    ranker.json                  RankerConfig (prompt switches, permutations, embedding sizes)
    adapter/                     peft LoRA adapter (adapter_config.json + adapter_model.safetensors)
    item_projector.safetensors   present when item soft tokens are on
    user_projector.safetensors   present when the user soft token is on
    candidate_projector.safetensors  present when candidates are signal tokens (ranker.signals)
    item_embeddings.safetensors  the item table the item projector was trained on ("embeddings",
                                 [num_items + 1, d]): publish these to the feature store
    trends.safetensors           recent popularity per item and day (ranker.trends), when used
    covisit.safetensors          other people's item-to-item co-visitation (ranker.covisit)
    demographics.safetensors     item popularity by user group (ranker.demographics), when used
    ease.safetensors             item-item co-occurrence for the history's EASE score (ranker.ease)
    lifecycle.safetensors        each item's interaction times (ranker.lifecycle), when used
    item_ids.json                the table's row ids (row i + 1 is item_ids[i]); when present the
                                 ranker reads item rows from its own table, so what it serves is
                                 exactly what it was trained on, whatever the feature store holds
    manifest.json
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ranker.backends.base import RankerBackend, RenderedPrompt
from ranker.projector import Projector
from ranker.prompts import (
    PromptConfig,
    PromptInput,
    PromptItem,
    PromptLayout,
    PromptTokenizer,
    render_prompt,
    reorder,
)
from ranker.run_tables import RunTables
from ranker.verbalizer import candidate_key, permutations, to_candidate_order

if TYPE_CHECKING:
    from ranker.examples import ItemFeatures
    from ranker.head import HeadRanker

CONFIG_FILE = "ranker.json"
ADAPTER_DIR = "adapter"
ITEM_PROJECTOR = "item_projector.safetensors"
USER_PROJECTOR = "user_projector.safetensors"
CANDIDATE_PROJECTOR = "candidate_projector.safetensors"
ITEM_EMBEDDINGS = "item_embeddings.safetensors"  # the item-token inputs training used
ITEM_IDS = "item_ids.json"  # row ids of ITEM_EMBEDDINGS (row 0 is padding)
PROJECTOR_FILES = {"item": ITEM_PROJECTOR, "user": USER_PROJECTOR, "candidate": CANDIDATE_PROJECTOR}


def trained_llm(run_dir: Path) -> tuple[Path | None, int | None]:
    """The base LLM folder a ranker run trained on and its decoder layers (its manifest)."""
    from tandem.artifacts import Manifest

    if not (run_dir / "manifest.json").is_file():
        return None, None
    config = Manifest.read(run_dir).config
    folder = config.get("llm_dir")
    layers = config.get("llm_layers") or (config.get("llm") or {}).get("layers")
    return (Path(folder) if folder else None), layers


def base_llm_dir(run_dir: Path | None, fallback: Path) -> Path:
    """The LLM folder ``run_dir`` trained on when it exists here, else ``fallback``."""
    folder = trained_llm(run_dir)[0] if run_dir is not None else None
    return folder if folder is not None and (folder / "config.json").is_file() else fallback


def check_llm_layers(run_dir: Path, llm_dir: Path) -> None:
    """Refuse to serve an adapter on an LLM with another number of layers than it trained on:
    peft would load it with missing weights and the scores would be noise."""
    _, layers = trained_llm(run_dir)
    config = llm_dir / "config.json"
    if layers is None or not config.is_file():
        return
    actual = json.loads(config.read_text()).get("num_hidden_layers")
    if actual != layers:
        raise ValueError(
            f"ranker run {run_dir.name} was trained on a {layers}-layer LLM but {llm_dir} has "
            f"{actual}: `tandem llm prepare --layers {layers} --out DIR` and point the LLM "
            "folder (TANDEM_LLM_DIR / --llm) at it"
        )


class ItemTable:
    """A run's own item rows by item id: fills ``PromptItem.embedding`` before rendering."""

    def __init__(self, item_ids: list[str], rows: np.ndarray):
        if rows.shape[0] != len(item_ids) + 1:
            raise ValueError(f"{rows.shape[0]} item rows for {len(item_ids)} ids (+ padding)")
        self.index = {item_id: n for n, item_id in enumerate(item_ids, start=1)}
        self.rows = rows

    @classmethod
    def load(cls, run_dir: Path) -> ItemTable:
        from safetensors.numpy import load_file

        rows = load_file(str(run_dir / ITEM_EMBEDDINGS))["embeddings"].astype(np.float32)
        return cls(json.loads((run_dir / ITEM_IDS).read_text()), rows)

    def matches(self, item_ids: list[str], vectors: np.ndarray) -> bool:
        """Whether this table was built on these retriever item vectors (row 0 padding): the
        user vectors the ranker reads at serving time must come from that same retriever."""
        dim = vectors.shape[1]
        if self.rows.shape[1] < dim:
            return False
        mine = np.array([self.index.get(i, 0) for i in item_ids])
        if not (mine > 0).all():
            return False
        return bool(np.allclose(self.rows[mine, :dim], vectors[1:], atol=1e-4))

    def _filled(self, item: PromptItem) -> PromptItem:
        row = self.index.get(item.item_id) if item.item_id is not None else None
        return item if row is None else replace(item, embedding=self.rows[row])

    def fill(self, inp: PromptInput) -> PromptInput:
        return replace(
            inp,
            history=[self._filled(i) for i in inp.history],
            candidates=[self._filled(i) for i in inp.candidates],
        )


def with_run_features(
    inp: PromptInput, item_table: ItemTable | None, tables: RunTables
) -> PromptInput:
    """``inp`` with a run's own item rows and its tables' columns: what both the LLM ranker and
    the head ranker read at serving time (the tables need the item table's ids)."""
    if item_table is not None:
        inp = item_table.fill(inp)
    if not tables.empty:
        inp = tables.apply(inp, item_table.index)
    return inp


def write_run_tables(run_dir: Path, features: ItemFeatures | None, tables: RunTables) -> None:
    """The files ``ItemTable.load`` and ``RunTables.load`` read back: the item rows training
    used (with their ids) when given, and the run's tables."""
    if features is not None:
        from safetensors.numpy import save_file

        table = np.ascontiguousarray(features.embeddings, dtype=np.float32)
        save_file({"embeddings": table}, str(run_dir / ITEM_EMBEDDINGS))
        (run_dir / ITEM_IDS).write_text(json.dumps(features.ids[1:]))
    tables.save(run_dir)


@dataclass(frozen=True)
class RankerConfig:
    prompt: PromptConfig = field(default_factory=PromptConfig)
    permutations: int = 1  # orders averaged per request (1 = one pass)
    shuffle: bool = False  # False: the first order is the given (retriever) order, as LlamaRec
    seed: int = 0  # permutation seed; with the candidates it fixes each prompt's order

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RankerConfig:
        raw = json.loads(text)
        return cls(**{**raw, "prompt": PromptConfig(**raw.get("prompt", {}))})


class Ranker:
    """Renders hybrid prompts and scores them through a backend."""

    def __init__(
        self,
        tokenizer,
        config: RankerConfig,
        backend: RankerBackend,
        item_projector: Projector | None = None,
        user_projector: Projector | None = None,
        candidate_projector: Projector | None = None,
        item_table: ItemTable | None = None,
        tables: RunTables = RunTables(),
    ):
        if config.prompt.item_soft_tokens and item_projector is None:
            raise ValueError("item soft tokens are on but no item projector was given")
        if config.prompt.user_soft_token and user_projector is None:
            raise ValueError("the user soft token is on but no user projector was given")
        if config.prompt.candidate_signals and candidate_projector is None:
            raise ValueError("candidate signals are on but no candidate projector was given")
        self.tokens = (
            tokenizer if isinstance(tokenizer, PromptTokenizer) else PromptTokenizer(tokenizer)
        )
        self.config = config
        self.backend = backend
        self.projectors = {
            "item": item_projector,
            "user": user_projector,
            "candidate": candidate_projector,
        }
        self._serving_projectors = {
            kind: projector.arrays()
            for kind, projector in self.projectors.items()
            if projector is not None
        }
        self.item_table = item_table
        self.tables = tables
        if not tables.empty and item_table is None:
            raise ValueError("a run's tables (trends, co-visitation...) need its item table (ids)")

    @classmethod
    def load(
        cls,
        run_dir: Path | None,
        llm_dir: Path,
        backend: RankerBackend | str = "transformers",
        *,
        config: RankerConfig | None = None,
        **backend_options,
    ) -> Ranker | HeadRanker:
        """A ranker from a trained run (or zero-shot from the bare LLM when ``run_dir`` is None).

        ``backend`` is a constructed backend (e.g. the vLLM client) or "transformers";
        ``backend_options`` go to ``TransformersBackendConfig``. ``config`` overrides the run's.
        A head run (``ranker.head``) loads as a ``HeadRanker``: no LLM, backend or options.
        """
        from ranker.llm import load_tokenizer
        from tandem.artifacts import resolve_run

        if run_dir is not None:
            from ranker.head import HeadRanker, is_head_run

            run_dir = resolve_run(run_dir)
            if is_head_run(run_dir):
                if config is not None:
                    raise ValueError(
                        f"{run_dir} is a head ranker: its rows are fixed by its training, so a "
                        "prompt override (a variant's `prompt`) does not apply to it"
                    )
                return HeadRanker.load(run_dir)
        tokenizer = load_tokenizer(llm_dir)
        projectors: dict[str, Projector] = {}
        adapter = table = None
        tables = RunTables()
        if run_dir is not None:
            check_llm_layers(run_dir, llm_dir)
            config = config or RankerConfig.from_json((run_dir / CONFIG_FILE).read_text())
            for kind, name in PROJECTOR_FILES.items():
                if (run_dir / name).is_file():
                    projectors[kind] = Projector.load(run_dir / name)
            if (run_dir / ADAPTER_DIR / "adapter_config.json").is_file():
                adapter = run_dir / ADAPTER_DIR
            if (run_dir / ITEM_IDS).is_file():
                table = ItemTable.load(run_dir)
            tables = RunTables.load(run_dir)
        config = config or RankerConfig()
        if isinstance(backend, str):
            if backend != "transformers":
                raise ValueError(f"unknown backend {backend!r}: pass 'transformers' or an instance")
            from ranker.backends.transformers import TransformersBackend, TransformersBackendConfig

            backend = TransformersBackend(
                TransformersBackendConfig(llm_dir=llm_dir, adapter_dir=adapter, **backend_options)
            )
        return cls(
            tokenizer,
            config,
            backend,
            projectors.get("item"),
            projectors.get("user"),
            projectors.get("candidate"),
            table,
            tables,
        )

    # -- rendering -----------------------------------------------------------------------

    def layout(self, inp: PromptInput) -> PromptLayout:
        inp = with_run_features(inp, self.item_table, self.tables)
        return render_prompt(inp, self.config.prompt, self.tokens)

    def project(self, layout: PromptLayout) -> np.ndarray | None:
        """Soft rows of ``layout`` through the matching projectors (float32), in numpy: the
        projectors' ``ProjectorArrays``, the same function as training's modules."""
        if not layout.soft_positions:
            return None
        from ranker.forward import soft_groups

        out = None
        for projector, rows, inputs, slots in soft_groups([layout], self._serving_projectors):
            projected = projector(inputs, slots if projector.anchor is not None else None)
            if out is None:
                out = np.empty((len(layout.soft_kinds), projected.shape[1]), dtype=np.float32)
            out[rows] = projected
        return out

    def render(self, inp: PromptInput) -> RenderedPrompt:
        """The prompt with candidates in the given order."""
        layout = self.layout(inp)
        return layout.with_soft_vectors(self.project(layout))

    def orders(self, inp: PromptInput) -> np.ndarray:
        """The candidate orders this ranker shows ``inp`` in (``[P, n]``)."""
        config = self.config
        drawn = config.permutations > 1 or config.shuffle  # else the given order: no key
        return permutations(
            len(inp.candidates),
            config.permutations,
            shuffle=config.shuffle,
            seed=config.seed,
            key=candidate_key([c.title for c in inp.candidates]) if drawn else 0,
        )

    def render_all(self, inp: PromptInput) -> tuple[list[RenderedPrompt], np.ndarray]:
        orders = self.orders(inp)
        return [self.render(reorder(inp, order)) for order in orders], orders

    # -- scoring -------------------------------------------------------------------------

    async def start(self) -> None:
        await self.backend.start()

    async def close(self) -> None:
        await self.backend.close()

    async def score(self, inp: PromptInput) -> np.ndarray:
        """Log-probability per candidate, in the input's candidate order."""
        prompts, orders = self.render_all(inp)
        scores = await self.backend.score(prompts)
        return to_candidate_order(np.stack(scores), orders)

    async def score_many(
        self, inputs: list[PromptInput], concurrency: int = 32
    ) -> list[np.ndarray]:
        """Score many inputs concurrently, so the backend batches them."""
        limit = asyncio.Semaphore(concurrency)

        async def one(inp: PromptInput) -> np.ndarray:
            async with limit:
                return await self.score(inp)

        return list(await asyncio.gather(*(one(inp) for inp in inputs)))
