"""LoRA SFT of the ranker (LlamaRec loss on the answer letter) with the projectors trained along.

Each example is one step of a user's training sequence: the history so far, the next item as
the target among 19 negatives (retriever hard negatives mixed with random items) in shuffled
positions. The loss is cross-entropy over the letter logits at the last position. Optional
RSLLM-style stage 1 trains the projectors only (LLM frozen) before LoRA joins. Prompt parts can
be dropped per example (``part_dropout``) so one adapter serves every ablation of the prompt.

Budgets (``max_steps``, ``max_minutes``) stop a session cleanly; ``checkpoint/`` in the run
folder (safetensors + JSON, no pickle) lets the next session resume where it stopped.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ranker.core import (
    ADAPTER_DIR,
    CONFIG_FILE,
    ITEM_EMBEDDINGS,
    ITEM_PROJECTOR,
    USER_PROJECTOR,
    RankerConfig,
)
from ranker.examples import CandidateSource, ItemFeatures, prompt_input, sample_candidates
from ranker.forward import autocast, collate, letter_logits, project_soft_rows
from ranker.fusion import fuse, tune_weight
from ranker.llm import load_model, load_tokenizer
from ranker.projector import Projector, ProjectorConfig
from ranker.prompts import PromptConfig, PromptInput, PromptLayout, PromptTokenizer, render_prompt
from ranker.verbalizer import MAX_CANDIDATES
from tandem.artifacts import Manifest, mark_latest
from tandem.data import Dataset
from tandem.metrics import mrr_at_k, ndcg_at_k, recall_at_k

CHECKPOINT_DIR = "checkpoint"
TRAIN_CONFIG_FILE = "train_config.json"
LOG_FILE = "train_log.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    prompt: PromptConfig = field(default_factory=PromptConfig.compact)
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")  # vLLM packs these (qkv)
    lr: float = 2e-4  # LoRA learning rate (LlamaRec: 1e-4)
    projector_lr: float = 1e-3
    warmup_steps: int = 20  # linear warm-up, then constant
    batch_size: int = 8  # examples per forward
    grad_accum: int = 1  # forwards per optimizer step
    max_grad_norm: float = 1.0
    max_steps: int = 1000  # optimizer steps in total (a resumed run counts on)
    max_minutes: float = 60.0  # wall-clock budget of one session
    stage1_steps: int = 0  # RSLLM stage 1: the first steps train the projectors only
    num_negatives: int = MAX_CANDIDATES - 1
    hard_negative_ratio: float = 0.5  # share of negatives from the retriever's top-20
    steps_per_user: int = 0  # most recent steps of each user's sequence used; 0 = all
    min_history: int = 1
    part_dropout: float = 0.0  # per example, drop preference / item / user tokens independently
    precision: str = "auto"  # bf16 autocast where the CPU has bf16 units, else fp32
    threads: int = 1  # torch threads; 1 is fastest when other jobs share the CPU
    valid_users: int = 64  # validation subset (the validation item, retriever top-20)
    eval_every: int = 100  # steps between validations (0 = only at the end)
    checkpoint_every: int = 25  # steps between checkpoints
    seed: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        raw = json.loads(text)
        raw["prompt"] = PromptConfig(**raw["prompt"])
        raw["target_modules"] = tuple(raw["target_modules"])
        return cls(**raw)


@dataclass
class TrainInputs:
    """Everything training reads besides the LLM."""

    dataset: Dataset
    features: ItemFeatures
    source: CandidateSource | None = None  # the retriever: hard negatives and user vectors
    preferences: Mapping[str, str] = field(default_factory=dict)  # user_id -> text


@dataclass
class ValidationSet:
    """LlamaRec-style validation: the validation item among the retriever's top-20."""

    layouts: list[PromptLayout]
    labels: np.ndarray  # the validation item's position among the candidates
    retriever_ranks: np.ndarray  # its retriever rank (-1 without a retriever)
    retriever_scores: np.ndarray  # [users, 20] retriever scores in candidate order ([users, 0])


@dataclass
class TrainState:
    step: int = 0
    cursor: int = 0  # examples consumed from the seeded example order
    examples: int = 0
    seconds: float = 0.0  # training time over all sessions
    last_loss: float = float("nan")
    validations: list[dict] = field(default_factory=list)


@dataclass
class TrainResult:
    run_dir: Path
    state: TrainState
    metrics: dict
    stopped_by: str


# -- examples ---------------------------------------------------------------------------


def example_pool(train: list[np.ndarray], steps_per_user: int, min_history: int) -> np.ndarray:
    """``[n, 2]`` (user, position): predict ``train[user][position]`` from what precedes it."""
    rows = []
    for user, seq in enumerate(train):
        start = max(min_history, 1)
        positions = list(range(start, len(seq)))
        if steps_per_user:
            positions = positions[-steps_per_user:]
        rows.extend((user, p) for p in positions)
    if not rows:
        raise ValueError("no training examples: sequences are too short for min_history")
    return np.asarray(rows, dtype=np.int64)


def example_order(pool_size: int, needed: int, seed: int) -> np.ndarray:
    """Epoch after epoch of seeded permutations of the pool, at least ``needed`` long."""
    rng = np.random.default_rng(seed)
    epochs = max(1, math.ceil(needed / pool_size))
    return np.concatenate([rng.permutation(pool_size) for _ in range(epochs)])


def drop_parts(inp: PromptInput, rng: np.random.Generator, rate: float) -> PromptInput:
    """Independently drop the preference, the item embeddings and the user vector."""
    if rate <= 0:
        return inp
    if rng.random() < rate:
        inp = replace(inp, preference=None)
    if rng.random() < rate:
        inp = replace(
            inp,
            history=[replace(i, embedding=None) for i in inp.history],
            candidates=[replace(i, embedding=None) for i in inp.candidates],
        )
    if rng.random() < rate:
        inp = replace(inp, user_embedding=None)
    return inp


class ExampleMaker:
    """Builds the training and validation prompts of one run."""

    def __init__(self, inputs: TrainInputs, config: TrainConfig, tokens: PromptTokenizer):
        self.inputs = inputs
        self.config = config
        self.tokens = tokens
        self.split = inputs.dataset.split()
        self.user_ids = inputs.dataset.interactions.user_ids
        self.num_items = inputs.dataset.catalog.num_items

    def _preference(self, user: int) -> str | None:
        return self.inputs.preferences.get(self.user_ids[user])

    def _vectors_and_top(self, histories: list[np.ndarray]):
        """User vectors, the retriever's top-20 and their scores (empty without a retriever)."""
        source = self.inputs.source
        if source is None:
            empty = np.zeros((len(histories), 0))
            return [None] * len(histories), empty.astype(np.int64), empty
        vectors = source.user_vectors(histories)
        top, scores = source.top_k(histories, MAX_CANDIDATES, vectors)
        return list(vectors), top, scores

    def training_batch(self, pairs: np.ndarray) -> tuple[list[PromptLayout], list[int]]:
        """Prompts and answer positions; an example's negatives and order depend on it alone."""
        histories = [self.split.train[u][:p] for u, p in pairs]
        targets = [int(self.split.train[u][p]) for u, p in pairs]
        vectors, top, _ = self._vectors_and_top(histories)
        layouts, labels = [], []
        for row, (user, position) in enumerate(pairs):
            rng = np.random.default_rng([self.config.seed, int(user), int(position)])
            candidates, label = sample_candidates(
                rng,
                targets[row],
                histories[row],
                top[row],
                self.num_items,
                self.config.num_negatives,
                self.config.hard_negative_ratio,
            )
            inp = prompt_input(
                self.inputs.features,
                histories[row],
                candidates,
                self._preference(user),
                vectors[row],
            )
            inp = drop_parts(inp, rng, self.config.part_dropout)
            layouts.append(render_prompt(inp, self.config.prompt, self.tokens))
            labels.append(label)
        return layouts, labels

    def validation_set(self) -> ValidationSet:
        """Prompts for the validation item, its position, its retriever rank and scores.

        As LlamaRec validates: users whose validation item is in the retriever's top-20, the
        candidates in retriever order (so the retriever's own order is the baseline to beat).
        Without a retriever: the item and 19 random negatives in a seeded order (rank -1).
        """
        order = np.random.default_rng(self.config.seed + 1).permutation(self.split.num_users)
        wanted = self.config.valid_users
        users, histories, targets, vectors, tops, top_scores = [], [], [], [], [], []
        for start in range(0, len(order), 256):
            chunk = order[start : start + 256]
            chunk_histories = [self.split.valid_inputs()[u] for u in chunk]
            chunk_vectors, top, scores = self._vectors_and_top(chunk_histories)
            for row, user in enumerate(chunk):
                target = int(self.split.valid_target[user])
                if top.shape[1] and target not in top[row]:
                    continue
                users.append(int(user))
                histories.append(chunk_histories[row])
                targets.append(target)
                vectors.append(chunk_vectors[row])
                tops.append(top[row])
                top_scores.append(scores[row])
            if len(users) >= wanted:
                break
        layouts, labels, retriever_ranks = [], [], []
        for user, history, target, vector, top in list(
            zip(users, histories, targets, vectors, tops, strict=True)
        )[:wanted]:
            if len(top):
                candidates = top
                retriever_ranks.append(int(np.flatnonzero(top == target)[0]))
            else:
                rng = np.random.default_rng([self.config.seed + 2, user])
                candidates, _ = sample_candidates(rng, target, history, top, self.num_items)
                retriever_ranks.append(-1)
            inp = prompt_input(
                self.inputs.features, history, candidates, self._preference(user), vector
            )
            layouts.append(render_prompt(inp, self.config.prompt, self.tokens))
            labels.append(int(np.flatnonzero(candidates == target)[0]))
        return ValidationSet(
            layouts,
            np.asarray(labels, dtype=np.int64),
            np.asarray(retriever_ranks, dtype=np.int64),
            np.asarray(top_scores[: len(layouts)], dtype=np.float64),
        )


# -- model ------------------------------------------------------------------------------


class RankerModel:
    """The LoRA-wrapped LLM and its projectors, trained together."""

    def __init__(self, llm, projectors: dict[str, Projector], pad_id: int, precision: str):
        self.llm = llm
        self.projectors = projectors
        self.pad_id = pad_id
        self.precision = precision
        self.hidden = llm.get_input_embeddings().weight.shape[1]

    def logits(self, layouts: list[PromptLayout]) -> torch.Tensor:
        batch = collate(
            [layout.token_ids for layout in layouts],
            [layout.soft_positions for layout in layouts],
            [layout.letter_token_ids for layout in layouts],
            self.pad_id,
        )
        with autocast(self.precision):
            soft = project_soft_rows(layouts, self.projectors, self.hidden)
            return letter_logits(self.llm, batch, soft)

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.llm.named_parameters() if "lora_" in n]

    def projector_parameters(self) -> list[torch.nn.Parameter]:
        return [p for proj in self.projectors.values() for p in proj.parameters()]

    def train(self, mode: bool = True) -> None:
        self.llm.train(mode)
        for projector in self.projectors.values():
            projector.train(mode)


def _calibrated_projector(in_dim: int, llm, sample: np.ndarray, seed: int) -> Projector:
    """A projector whose initial outputs have the size of the LLM's token embeddings."""
    hidden = llm.get_input_embeddings().weight.shape[1]
    torch.manual_seed(seed)
    projector = Projector(ProjectorConfig(in_dim=in_dim, out_dim=hidden, out_scale=1.0))
    with torch.no_grad():
        out = projector(torch.from_numpy(sample.astype(np.float32)))
        target = llm.get_input_embeddings().weight.float().pow(2).mean().sqrt()
        scale = float(target / out.pow(2).mean().sqrt().clamp(min=1e-8))
        projector.scale.fill_(scale)
    return projector


def _peft(llm, config: TrainConfig, adapter: Path | None):
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter is not None:
        return PeftModel.from_pretrained(llm, adapter, is_trainable=True)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(llm, lora)


# -- checkpoints (safetensors + JSON) ---------------------------------------------------


def save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    meta = {"param_groups": state["param_groups"], "scalars": scalars}
    save_file(tensors, str(path), metadata={"optimizer": json.dumps(meta)})


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["optimizer"])
    state: dict[int, dict] = {}
    for key, value in [*load_file(str(path)).items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _write_weights(model: RankerModel, folder: Path) -> None:
    model.llm.save_pretrained(folder / ADAPTER_DIR, safe_serialization=True)
    for kind, name in (("item", ITEM_PROJECTOR), ("user", USER_PROJECTOR)):
        if kind in model.projectors:
            model.projectors[kind].save(folder / name)


def save_checkpoint(
    run_dir: Path, model: RankerModel, optimizer: torch.optim.Optimizer, state: TrainState
) -> None:
    tmp = run_dir / (CHECKPOINT_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _write_weights(model, tmp)
    save_optimizer(optimizer, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2))
    final = run_dir / CHECKPOINT_DIR
    old = run_dir / (CHECKPOINT_DIR + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.replace(old)
    tmp.replace(final)
    shutil.rmtree(old, ignore_errors=True)


# -- validation -------------------------------------------------------------------------


def ranks_from_logits(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """0-based rank of each label among its row's letters (pessimistic on ties)."""
    rows = np.arange(len(labels))
    target = logits[rows, labels][:, None]
    return ((logits > target).sum(1) + (logits == target).sum(1) - 1).astype(np.int64)


def tune_rank_weight(logits: np.ndarray, labels: np.ndarray, retriever_scores: np.ndarray):
    """The serving fusion weight with the best validation NDCG@10, and the NDCG per weight."""

    def ndcg(weight: float) -> float:
        fused = [fuse(r, s, weight) for r, s in zip(retriever_scores, logits, strict=True)]
        return ndcg_at_k(ranks_from_logits(np.stack(fused), labels), 10)

    return tune_weight(ndcg)


def validate(model: RankerModel, valid: ValidationSet, batch_size: int) -> dict:
    model.train(False)
    logits, losses = [], []
    with torch.no_grad():
        for start in range(0, len(valid.layouts), batch_size):
            chunk = model.logits(valid.layouts[start : start + batch_size])
            target = torch.as_tensor(valid.labels[start : start + batch_size])
            losses.append(torch.nn.functional.cross_entropy(chunk, target, reduction="sum").item())
            logits.append(chunk.float().numpy())
    model.train(True)
    logits_all = np.concatenate(logits)
    ranks = ranks_from_logits(logits_all, valid.labels)
    retrieved = (valid.retriever_ranks >= 0).any()
    shown = np.where(valid.retriever_ranks >= 0, valid.retriever_ranks, MAX_CANDIDATES - 1)
    metrics = {
        "valid_loss": round(sum(losses) / len(valid.labels), 4),
        "valid_hr@1": round(recall_at_k(ranks, 1), 4),
        "valid_ndcg@10": round(ndcg_at_k(ranks, 10), 4),
        "valid_mrr@10": round(mrr_at_k(ranks, 10), 4),
        "valid_retriever_order_ndcg@10": round(ndcg_at_k(shown, 10), 4) if retrieved else None,
        "valid_users": len(valid.labels),
    }
    if retrieved:
        weight, curve = tune_rank_weight(logits_all, valid.labels, valid.retriever_scores)
        metrics |= {"rank_weight": weight, "valid_fused_ndcg@10": curve[str(weight)]}
    return metrics


# -- the loop ---------------------------------------------------------------------------


def _lr_factor(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def train_ranker(
    inputs: TrainInputs,
    llm_dir: Path,
    run_dir: Path,
    config: TrainConfig,
    *,
    parents: Mapping[str, str] | None = None,
    resume: bool = False,
    on_progress: Callable[[TrainState, float], None] | None = None,
    on_log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train (or resume) into ``run_dir``; write adapter, projectors and manifest at the end."""
    say = on_log or (lambda _message: None)
    prompt = config.prompt
    if prompt.user_soft_token and inputs.source is None:
        raise ValueError("the user soft token needs the retriever (its user vectors)")
    if prompt.item_soft_tokens and inputs.features.embeddings is None:
        raise ValueError("item soft tokens need item embeddings (enrichment or the retriever)")
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = run_dir / CHECKPOINT_DIR
    if resume:
        if not (checkpoint / "state.json").is_file():
            raise FileNotFoundError(f"{run_dir} has no {CHECKPOINT_DIR}/state.json to resume from")
        (run_dir / "manifest.json").unlink(missing_ok=True)
    (run_dir / TRAIN_CONFIG_FILE).write_text(config.to_json())
    (run_dir / CONFIG_FILE).write_text(RankerConfig(prompt=prompt, seed=config.seed).to_json())

    torch.set_num_threads(config.threads)
    tokens = PromptTokenizer(load_tokenizer(llm_dir))
    maker = ExampleMaker(inputs, config, tokens)
    llm = load_model(llm_dir)
    projectors: dict[str, Projector] = {}
    if resume:
        state = TrainState(**json.loads((checkpoint / "state.json").read_text()))
        for kind, name in (("item", ITEM_PROJECTOR), ("user", USER_PROJECTOR)):
            if (checkpoint / name).is_file():
                projectors[kind] = Projector.load(checkpoint / name).train()
        llm = _peft(llm, config, checkpoint / ADAPTER_DIR)
    else:
        state = TrainState()
        if prompt.item_soft_tokens:
            sample = inputs.features.embeddings[1 : 1 + 512]
            projectors["item"] = _calibrated_projector(sample.shape[1], llm, sample, config.seed)
        if prompt.user_soft_token:
            sample = inputs.source.user_vectors(maker.split.train[:256])
            projectors["user"] = _calibrated_projector(
                sample.shape[1], llm, sample, config.seed + 1
            )
        llm = _peft(llm, config, None)
    model = RankerModel(llm, projectors, tokens.placeholder_id, config.precision)
    model.train(True)
    groups = [{"params": model.lora_parameters(), "lr": config.lr, "base_lr": config.lr}]
    if projectors:
        groups.append(
            {
                "params": model.projector_parameters(),
                "lr": config.projector_lr,
                "base_lr": config.projector_lr,
            }
        )
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    if resume:
        load_optimizer(optimizer, checkpoint / "optimizer.safetensors")

    pool = example_pool(maker.split.train, config.steps_per_user, config.min_history)
    per_step = config.batch_size * config.grad_accum
    order = example_order(len(pool), config.max_steps * per_step, config.seed)
    valid = maker.validation_set() if config.valid_users else None
    if valid is not None and not valid.layouts:
        say("no validation user has its item in the retriever's top-20: validation skipped")
        valid = None
    say(
        f"{len(pool)} training examples (users x steps), {per_step} per step, "
        f"{len(valid.layouts) if valid else 0} validation users"
    )
    log = (run_dir / LOG_FILE).open("a")
    started = time.perf_counter()
    session_start_seconds = state.seconds
    stopped_by = "max_steps"
    try:
        while state.step < config.max_steps:
            if (time.perf_counter() - started) / 60 >= config.max_minutes:
                stopped_by = "max_minutes"
                break
            stage1 = state.step < config.stage1_steps
            for param in model.lora_parameters():
                param.requires_grad_(not stage1)
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(config.grad_accum):
                pairs = pool[order[state.cursor : state.cursor + config.batch_size]]
                state.cursor += config.batch_size
                layouts, labels = maker.training_batch(pairs)
                torch.manual_seed(config.seed + state.step * 7 + micro)
                logits = model.logits(layouts)
                loss = torch.nn.functional.cross_entropy(logits, torch.as_tensor(labels))
                (loss / config.grad_accum).backward()
                total += loss.item() / config.grad_accum
                state.examples += len(layouts)
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * _lr_factor(state.step, config.warmup_steps)
            optimizer.step()
            state.step += 1
            state.last_loss = total
            state.seconds = session_start_seconds + time.perf_counter() - started
            rate = state.examples / max(state.seconds, 1e-9)
            record = {"step": state.step, "loss": round(total, 4), "stage": 1 if stage1 else 2,
                      "examples": state.examples, "seconds": round(state.seconds, 1)}  # fmt: skip
            log.write(json.dumps(record) + "\n")
            log.flush()
            if on_progress is not None:
                on_progress(state, rate)
            if valid and config.eval_every and state.step % config.eval_every == 0:
                metrics = validate(model, valid, config.batch_size)
                state.validations.append({"step": state.step, **metrics})
                log.write(json.dumps({"step": state.step, **metrics}) + "\n")
                say(f"step {state.step}: {metrics}")
            if state.step % config.checkpoint_every == 0:
                save_checkpoint(run_dir, model, optimizer, state)
    finally:
        log.close()
    if valid and (not state.validations or state.validations[-1]["step"] != state.step):
        metrics = validate(model, valid, config.batch_size)
        state.validations.append({"step": state.step, **metrics})
        say(f"step {state.step}: {metrics}")
    save_checkpoint(run_dir, model, optimizer, state)
    for name in (ADAPTER_DIR,):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    _write_weights(model, run_dir)
    if prompt.item_soft_tokens:
        from safetensors.numpy import save_file as save_numpy

        table = np.ascontiguousarray(inputs.features.embeddings, dtype=np.float32)
        save_numpy({"embeddings": table}, str(run_dir / ITEM_EMBEDDINGS))
    final = state.validations[-1] if state.validations else {}
    metrics = {
        "steps": state.step,
        "examples": state.examples,
        "train_seconds": round(state.seconds, 1),
        "examples_per_second": round(state.examples / max(state.seconds, 1e-9), 3),
        "last_loss": round(state.last_loss, 4),
        "stopped_by": stopped_by,
        **{k: v for k, v in final.items() if k != "step"},
    }
    manifest = Manifest(
        kind="ranker",
        run_id=run_dir.name,
        dataset=inputs.dataset.name,
        config={"train": json.loads(config.to_json()), "llm_dir": str(llm_dir)},
        data_fingerprint=inputs.dataset.summary.fingerprint,
        metrics=metrics,
        parents=dict(parents or {}),
    )
    manifest.write(run_dir)
    mark_latest(run_dir)
    return TrainResult(run_dir, state, metrics, stopped_by)
