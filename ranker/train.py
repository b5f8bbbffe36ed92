"""LoRA SFT of the ranker (LlamaRec loss on the answer letter) with the projectors trained along.

The loss is cross-entropy over the letter logits at the last position, plus, optionally, a KL
term towards the retriever's softmax over the same candidates (listwise distillation) whose
weight falls to 0 as training goes on. A curriculum can start with fewer candidates (4 -> 8 ->
20): pointing among 20 from the start did not leave chance in a probe on this CPU, with the
curriculum it did. Optional RSLLM-style stage 1 trains the projectors only.

Budgets (``max_steps``, ``max_minutes``) stop a session cleanly; ``checkpoint/`` in the run
folder (safetensors + JSON, no pickle) lets the next session resume where it stopped. The
examples come from ``ranker.train_data`` (real data) or ``ranker.synthetic`` (sanity tasks),
through the same loop.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

import torch

from ranker.core import ADAPTER_DIR, CONFIG_FILE, RankerConfig, write_run_tables
from ranker.llm import load_model, load_tokenizer
from ranker.prompts import PromptConfig, PromptTokenizer
from ranker.train_data import (
    ExampleConfig,
    ExampleMaker,
    ExampleSource,
    TrainInputs,
    ValidationSet,
    with_side_features,
)
from ranker.train_model import (
    CHECKPOINT_DIR,
    RankerModel,
    load_optimizer,
    load_projectors,
    new_model,
    optimizer_for,
    probe,
    save_checkpoint,
    with_lora,
    write_weights,
)
from ranker.train_objective import lr_factor, ranker_loss
from ranker.train_validate import validate
from ranker.verbalizer import MAX_CANDIDATES
from tandem.artifacts import Manifest, mark_latest

TRAIN_CONFIG_FILE = "train_config.json"
LOG_FILE = "train_log.jsonl"

__all__ = ["TrainConfig", "TrainInputs", "TrainResult", "TrainState", "train_ranker"]


@dataclass(frozen=True)
class TrainConfig:
    prompt: PromptConfig = field(default_factory=PromptConfig.compact)
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")  # vLLM packs these (qkv)
    lr: float = 2e-4  # LoRA learning rate (LlamaRec: 1e-4)
    projector_lr: float = 1e-3
    projector_hidden: int = 0  # projectors' MLP width; 0 = the LLM's hidden size. Narrow (8-32)
    # when the lists are few: a wide projector memorised 3.3k honest lists in two epochs
    warmup_steps: int = 20  # linear warm-up, then constant (or the decay below)
    # Cosine decay of both learning rates to 10% over this many examples seen (counted across
    # resumed sessions); 0 = constant. A constant rate left the synthetic match task hovering
    # at 0.72-0.79 held-out accuracy from 40k examples on (benchmarks/ranker_learning.md).
    decay_examples: int = 0
    batch_size: int = 8  # examples per forward
    grad_accum: int = 1  # forwards per optimizer step
    max_grad_norm: float = 1.0
    max_steps: int = 1000  # optimizer steps in total (a resumed run counts on)
    max_minutes: float = 60.0  # wall-clock budget of one session
    stage1_steps: int = 0  # RSLLM stage 1: the first steps train the projectors only
    candidates: str = "sampled"  # "sampled" (LlamaRec) or "retrieved" (retriever top-20, served)
    num_negatives: int = MAX_CANDIDATES - 1
    hard_negative_ratio: float = 0.5  # sampled mode: share of negatives from the top-20
    steps_per_user: int = 0  # most recent steps of each user's sequence used; 0 = all
    min_history: int = 1
    part_dropout: float = 0.0  # per example, drop preference / item / user tokens independently
    curriculum: tuple[int, ...] = ()  # candidate counts of the first stages (e.g. 4, 8), then 20
    curriculum_examples: int = 2000  # examples each curriculum stage lasts
    distill_weight: float = 0.0  # weight of KL(retriever softmax || ranker) at the start
    distill_examples: int = 0  # examples over which that weight falls to 0; 0 = constant
    # Train the fused system, not the ranker alone: the loss reads the retriever's log-softmax
    # plus the ranker's letter logits, so the ranker learns what the retriever misses instead of
    # rebuilding it. Fused at weight 0.5 the gateway orders exactly like that sum.
    residual: bool = False
    aux_weight: float = 0.0  # per-candidate probe loss on the signal tokens (training only)
    side_features: bool = False  # item rows gain popularity, year and genres (ranker.signals)
    trends: bool = False  # candidates carry recent popularity at decision time (ranker.trends)
    covisit: bool = False  # candidates carry other people's co-visitation (ranker.covisit)
    shuffle: bool = True  # retrieved candidates in a random order (ranker.train_data)
    letter_anchors: bool = True  # candidate signal tokens start as their letter's embedding
    precision: str = "auto"  # bf16 autocast where the device computes bf16 natively, else fp32
    threads: int = 1  # torch threads; 1 is fastest when other jobs share the CPU
    device: str = "cpu"  # "cuda" trains on a GPU; the run (and its resume) stays the same
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
        raw["curriculum"] = tuple(raw.get("curriculum", ()))
        return cls(**raw)

    def __post_init__(self) -> None:
        if self.residual and self.distill_weight > 0:
            raise ValueError(
                "a residual ranker already adds the retriever's softmax: distilling towards it "
                "as well makes no sense (set distill_weight to 0)"
            )

    def examples(self) -> ExampleConfig:
        return ExampleConfig(
            prompt=self.prompt,
            candidates=self.candidates,
            num_negatives=self.num_negatives,
            hard_negative_ratio=self.hard_negative_ratio,
            steps_per_user=self.steps_per_user,
            min_history=self.min_history,
            part_dropout=self.part_dropout,
            valid_users=self.valid_users,
            trends=self.trends,
            covisit=self.covisit,
            shuffle=self.shuffle,
            seed=self.seed,
        )

    def candidates_at(self, examples: int) -> int:
        """Candidates per prompt once ``examples`` have been seen (the curriculum)."""
        stage = examples // max(self.curriculum_examples, 1)
        return self.curriculum[stage] if stage < len(self.curriculum) else MAX_CANDIDATES

    def distill_at(self, examples: int) -> float:
        if not self.distill_examples:
            return self.distill_weight
        return self.distill_weight * max(0.0, 1.0 - examples / self.distill_examples)


@dataclass
class TrainState:
    step: int = 0
    cursor: int = 0  # example-order entries consumed
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


def fit(
    model: RankerModel,
    source: ExampleSource,
    config: TrainConfig,
    state: TrainState,
    optimizer: torch.optim.Optimizer,
    *,
    valid: ValidationSet | None,
    log: IO[str],
    checkpoint: Callable[[], None] | None = None,
    on_progress: Callable[[TrainState, float], None] | None = None,
    say: Callable[[str], None] = lambda _m: None,
) -> str:
    """The training loop; returns what stopped it ("max_steps" or "max_minutes")."""
    started = time.perf_counter()
    session_start_seconds = state.seconds
    model.train(True)
    while state.step < config.max_steps:
        if (time.perf_counter() - started) / 60 >= config.max_minutes:
            return "max_minutes"
        stage1 = state.step < config.stage1_steps
        for param in model.lora_parameters():
            param.requires_grad_(not stage1)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        num_candidates = config.candidates_at(state.examples)
        for micro in range(config.grad_accum):
            batch = source.batch(state.cursor, config.batch_size, num_candidates)
            state.cursor += batch.consumed
            torch.manual_seed(config.seed + state.step * 7 + micro)
            letters, probe_logits = model.scores(batch.layouts)
            loss = ranker_loss(
                letters,
                batch.labels,
                batch.teacher,
                config.distill_at(state.examples),
                probe_logits,
                config.aux_weight,
                config.residual,
            )
            (loss / config.grad_accum).backward()
            total += loss.item() / config.grad_accum
            state.examples += len(batch.layouts)
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(
                state.step, config.warmup_steps, state.examples, config.decay_examples
            )
        optimizer.step()
        state.step += 1
        state.last_loss = total
        state.seconds = session_start_seconds + time.perf_counter() - started
        rate = state.examples / max(state.seconds, 1e-9)
        record = {"step": state.step, "loss": round(total, 4), "stage": 1 if stage1 else 2,
                  "candidates": num_candidates, "examples": state.examples,
                  "seconds": round(state.seconds, 1)}  # fmt: skip
        log.write(json.dumps(record) + "\n")
        log.flush()
        if on_progress is not None:
            on_progress(state, rate)
        if valid and config.eval_every and state.step % config.eval_every == 0:
            metrics = validate(model, valid, config.batch_size, config.residual)
            state.validations.append({"step": state.step, "examples": state.examples, **metrics})
            log.write(json.dumps(state.validations[-1]) + "\n")
            say(f"step {state.step}: {metrics}")
        if checkpoint is not None and state.step % config.checkpoint_every == 0:
            checkpoint()
    return "max_steps"


def final_validation(model, valid, config, state, say) -> None:
    if valid and (not state.validations or state.validations[-1]["step"] != state.step):
        metrics = validate(model, valid, config.batch_size, config.residual)
        state.validations.append({"step": state.step, "examples": state.examples, **metrics})
        say(f"step {state.step}: {metrics}")


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
    if (prompt.user_soft_token or prompt.candidate_signals) and inputs.source is None:
        raise ValueError("the user token and candidate signals need the retriever run")
    if prompt.item_soft_tokens and inputs.features.embeddings is None:
        raise ValueError("item soft tokens need item embeddings (enrichment or the retriever)")
    if config.side_features:
        inputs = with_side_features(inputs)
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
    maker = ExampleMaker(inputs, config.examples(), tokens)
    llm = load_model(llm_dir)
    if resume:
        state = TrainState(**json.loads((checkpoint / "state.json").read_text()))
        llm = with_lora(llm, config, checkpoint / ADAPTER_DIR)
        model = RankerModel(
            llm,
            load_projectors(checkpoint),
            tokens.placeholder_id,
            config.precision,
            probe(llm, config),
            config.device,
        )
    else:
        state = TrainState()
        model = new_model(llm, maker, tokens, config)
    optimizer = optimizer_for(model, config)
    if resume:
        load_optimizer(optimizer, checkpoint / "optimizer.safetensors")

    valid = maker.validation_set() if config.valid_users else None
    if valid is not None and not valid.layouts:
        say("no validation user has its item in the retriever's top-20: validation skipped")
        valid = None
    say(
        f"{len(maker.pool)} training examples (users x steps), "
        f"{config.batch_size * config.grad_accum} per step, "
        f"{len(valid.layouts) if valid else 0} validation users"
    )
    with (run_dir / LOG_FILE).open("a") as log:
        stopped_by = fit(
            model,
            maker,
            config,
            state,
            optimizer,
            valid=valid,
            log=log,
            checkpoint=lambda: save_checkpoint(run_dir, model, optimizer, state),
            on_progress=on_progress,
            say=say,
        )
    final_validation(model, valid, config, state, say)
    save_checkpoint(run_dir, model, optimizer, state)
    shutil.rmtree(run_dir / ADAPTER_DIR, ignore_errors=True)
    write_weights(model, run_dir)
    uses_items = prompt.item_soft_tokens or prompt.candidate_signals
    write_run_tables(run_dir, inputs.features if uses_items else None, maker.tables)
    final = state.validations[-1] if state.validations else {}
    metrics = {
        "steps": state.step,
        "examples": state.examples,
        "train_seconds": round(state.seconds, 1),
        "examples_per_second": round(state.examples / max(state.seconds, 1e-9), 3),
        "last_loss": round(state.last_loss, 4),
        "stopped_by": stopped_by,
        **{k: v for k, v in final.items() if k not in ("step", "examples")},
    }
    manifest = Manifest(
        kind="ranker",
        run_id=run_dir.name,
        dataset=inputs.dataset.name,
        config={
            "train": json.loads(config.to_json()),
            "llm_dir": str(llm_dir),
            "llm_layers": json.loads((llm_dir / "config.json").read_text())["num_hidden_layers"],
        },
        data_fingerprint=inputs.dataset.summary.fingerprint,
        metrics=metrics,
        parents=dict(parents or {}),
    )
    manifest.write(run_dir)
    mark_latest(run_dir)
    return TrainResult(run_dir, state, metrics, stopped_by)
