"""Training a ``HeadRanker``: honest lists from teacher retrievers, validated on the served one.

Lists a retriever makes on positions it trained on are easier than the lists it serves (it
has seen those items: recall@20 0.392 vs 0.321 on validation for the served LRURec), and a
head fitted on them learns to trust the retriever too much; on validation it did not beat
retriever order (``benchmarks/results/ranker_headroom_relative.md``). A *teacher* trained with
``tandem retriever train --holdout-last N`` never saw each user's last N training items, so
its lists on exactly those positions look like served ones. The head trains on the teachers'
lists and is validated on the served retriever's, which works because its rows leave out the
retriever's vector space (``PromptConfig.signal_embeddings=False``): a score, a rank and a
cosine mean the same under any retriever.

The loss is listwise cross-entropy on the true candidate over
``scale * log_softmax(retriever) + rows @ w + b``, starting at exactly the retriever (w = 0,
scale = 1); AdamW with weight decay keeps ``w`` small where the lists say little.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ranker.core import CONFIG_FILE, RankerConfig, write_run_tables
from ranker.head import HEAD_FILE, LinearHead
from ranker.prompts import PromptConfig, PromptLayout, PromptTokenizer
from ranker.train_data import ExampleConfig, ExampleMaker, TrainInputs, with_side_features
from ranker.train_objective import retriever_log_softmax
from ranker.train_validate import served_weight
from tandem.artifacts import Manifest, mark_latest
from tandem.metrics import ndcg_at_k

PROMPT = PromptConfig.pointer(
    user_soft_token=False, relative_signals=True, signal_embeddings=False
)  # the rows: relative to the list, no retriever-space columns (serve any retriever)


@dataclass(frozen=True)
class HeadTrainConfig:
    epochs: int = 30  # passes over the teachers' lists (3-8k lists: seconds each)
    lr: float = 1e-3  # AdamW
    weight_decay: float = 1e-2
    batch_size: int = 256  # lists per step
    max_lists: int = 30_000  # per teacher, at most
    trends: bool = True  # recent popularity columns (ranker.trends)
    covisit: bool = True  # co-visitation columns (ranker.covisit)
    demographics: bool = False  # lift in the user's gender / age / occupation groups
    ease: bool = True  # the history's EASE score, own row left out (ranker.ease; helped on valid)
    lifecycle: bool = False  # use before the decision and age per candidate (ranker.lifecycle)
    seed: int = 0


@dataclass(frozen=True)
class Teacher:
    """A teacher retriever's inputs and the tail it held out (``steps_per_user``)."""

    inputs: TrainInputs
    holdout_last: int


def candidate_rows(layout: PromptLayout) -> np.ndarray:
    """The signal rows of a rendered pointer prompt (the last soft inputs, candidate order)."""
    n = len(layout.letter_token_ids)
    return np.stack(layout.soft_inputs[-n:])


def full_lists(maker: ExampleMaker, batch: int = 256):
    """The maker's training lists with all 20 candidates, one pass over its pool: (layout,
    true candidate, retriever scores) each."""
    cursor = 0
    while cursor < len(maker.pool):
        got = maker.batch(cursor, batch)
        cursor += got.consumed
        for layout, label, teacher in zip(got.layouts, got.labels, got.teacher, strict=True):
            if len(layout.letter_token_ids) == 20:
                yield layout, label, teacher


def collect(maker: ExampleMaker, wanted: int):
    """Up to ``wanted`` training lists of 20, one pass at most: rows ``[n, 20, F]``, the
    retriever's log-softmax ``[n, 20]`` and the true candidate ``[n]``."""
    rows, base, labels = [], [], []
    for layout, label, teacher in full_lists(maker):
        rows.append(candidate_rows(layout))
        base.append(teacher)
        labels.append(label)
        if len(labels) == wanted:
            break
    if not labels:
        raise ValueError("no training list has its target among the teacher's top-20")
    return np.stack(rows), retriever_log_softmax(base).numpy(), np.asarray(labels)


class ListwiseHead(nn.Module):
    """``scale * retriever_log_softmax + f(rows)``; ``f`` (linear, or an MLP of ``hidden``)
    starts at 0, a residual on the teacher, unless the retriever is left out."""

    def __init__(self, dim: int, hidden: int = 0, with_retriever: bool = True):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(dim, hidden), nn.GELU()] if hidden else []
        last = nn.Linear(hidden or dim, 1)
        if with_retriever:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        self.f = nn.Sequential(*layers, last)
        self.scale = nn.Parameter(torch.tensor(1.0 if with_retriever else 0.0))
        self.scale.requires_grad_(with_retriever)

    def forward(self, rows: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return self.scale * base + self.f(rows).squeeze(-1)

    def linear(self) -> LinearHead:
        """The servable form of a linear head (no hidden layer)."""
        if len(self.f) != 1:
            raise ValueError("only a linear head (hidden=0) is served")
        layer = self.f[0]
        return LinearHead(
            layer.weight.detach().numpy()[0].copy(),
            float(layer.bias.detach()),
            float(self.scale.detach()),
        )


def fit_head(
    head: ListwiseHead, rows, base, labels, config: HeadTrainConfig = HeadTrainConfig()
) -> ListwiseHead:
    """Listwise cross-entropy on the true candidate, shuffled mini-batches, seeded."""
    torch.manual_seed(config.seed)
    x, b, y = (torch.as_tensor(a) for a in (rows, base, labels))
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    for _ in range(config.epochs):
        for idx in torch.randperm(len(y)).split(config.batch_size):
            loss = nn.functional.cross_entropy(head(x[idx], b[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return head.eval()


def example_config(config: HeadTrainConfig, steps_per_user: int, valid_users: int):
    return ExampleConfig(
        prompt=PROMPT, candidates="retrieved", trends=config.trends, covisit=config.covisit,
        demographics=config.demographics, ease=config.ease, lifecycle=config.lifecycle,
        shuffle=True, valid_users=valid_users, steps_per_user=steps_per_user, seed=config.seed,
    )  # fmt: skip


@dataclass
class HeadValidation:
    """A head on the served retriever's validation lists (every user whose item it retrieves)."""

    maker: ExampleMaker  # holds the tables the served rows are computed from
    rows: np.ndarray  # [users, 20, F]
    logits: np.ndarray  # the head's scores, [users, 20]
    labels: np.ndarray
    retriever_scores: np.ndarray
    retriever_ranks: np.ndarray
    losses: np.ndarray  # the head's listwise cross-entropy per list
    metrics: dict  # tuned weight, its gain interval, fused NDCG@10, losses


def fit_on_teachers(
    teachers: Sequence[Teacher],
    tokens: PromptTokenizer,
    config: HeadTrainConfig,
    say: Callable[[str], None] = lambda _message: None,
) -> tuple[ListwiseHead, list[int]]:
    """The head fitted on every teacher's held-out lists, and how many lists each gave."""
    if not teachers:
        raise ValueError("a head trains on at least one teacher's lists (--teacher-run)")
    parts, per_teacher = [], []
    for teacher in teachers:
        if teacher.holdout_last < 1:
            raise ValueError(
                "a teacher must hold out each user's last N training items (`tandem retriever "
                "train --holdout-last N`): the served retriever's own lists are too easy"
            )
        maker = ExampleMaker(
            with_side_features(teacher.inputs),
            example_config(config, teacher.holdout_last, 0),
            tokens,
        )
        parts.append(collect(maker, config.max_lists))
        per_teacher.append(len(parts[-1][2]))
        say(f"teacher with the last {teacher.holdout_last} held out: {per_teacher[-1]} lists")
    rows, base, labels = (np.concatenate(p) for p in zip(*parts, strict=True))
    return fit_head(ListwiseHead(rows.shape[-1]), rows, base, labels, config), per_teacher


def validate_head(
    module: ListwiseHead, served: TrainInputs, tokens: PromptTokenizer, config: HeadTrainConfig
) -> HeadValidation:
    """``module`` on ``served``'s validation lists: the fusion weight tuned there, its gain's
    interval, and the listwise losses."""
    served = with_side_features(served)
    num_users = served.dataset.split().num_users
    maker = ExampleMaker(served, example_config(config, 0, num_users), tokens)
    valid = maker.validation_set()
    if not valid.layouts:
        raise ValueError("no validation user has its item in the served retriever's top-20")
    head = module.linear()
    rows = np.stack([candidate_rows(layout) for layout in valid.layouts])
    logits = np.stack([head.scores(r) for r in rows])
    chosen = served_weight(logits, valid.labels, valid.retriever_scores, seed=config.seed)
    losses, alone = list_losses(module, rows, valid)
    metrics = {  # mean listwise losses: the LLM ranker's learning curves report the same
        **chosen,
        "valid_loss": round(float(losses.mean()), 4),
        "valid_retriever_loss": round(float(alone.mean()), 4),
    }
    return HeadValidation(
        maker, rows, logits, valid.labels, valid.retriever_scores, valid.retriever_ranks,
        losses, metrics,
    )  # fmt: skip


def train_head(
    served: TrainInputs,
    teachers: Sequence[Teacher],
    tokens: PromptTokenizer,
    run_dir: Path,
    config: HeadTrainConfig = HeadTrainConfig(),
    *,
    parents: Mapping[str, str] | None = None,
    on_log: Callable[[str], None] | None = None,
) -> Manifest:
    """Fit on the teachers' lists, validate on ``served``'s (every validation user whose item
    it retrieves), write the run folder and its manifest; the manifest's ``rank_weight`` is the
    tuned fusion weight when its validation gain's interval excludes 0, else 0."""
    say = on_log or (lambda _message: None)
    started = time.perf_counter()
    module, per_teacher = fit_on_teachers(teachers, tokens, config, say)
    head = module.linear()
    valid = validate_head(module, served, tokens, config)
    say(f"validation ({len(valid.labels)} users with their item retrieved): {valid.metrics}")

    run_dir.mkdir(parents=True, exist_ok=True)
    head.save(run_dir / HEAD_FILE)
    (run_dir / CONFIG_FILE).write_text(RankerConfig(prompt=PROMPT, seed=config.seed).to_json())
    maker = valid.maker
    write_run_tables(run_dir, maker.inputs.features, maker.tables)  # what the served rows read
    manifest = Manifest(
        kind="ranker",
        run_id=run_dir.name,
        dataset=served.dataset.name,
        config={"head": asdict(config), "prompt": asdict(PROMPT), "llm_dir": None},
        data_fingerprint=served.dataset.summary.fingerprint,
        metrics={
            "examples": sum(per_teacher),
            "lists_per_teacher": per_teacher,
            "retriever_scale": round(head.scale, 4),
            "valid_users": len(valid.labels),
            "valid_retriever_order_ndcg@10": round(ndcg_at_k(valid.retriever_ranks, 10), 4),
            **valid.metrics,
            "train_seconds": round(time.perf_counter() - started, 1),
        },
        parents=dict(parents or {}),
    )
    manifest.write(run_dir)
    mark_latest(run_dir)
    return manifest


def list_losses(module: ListwiseHead, rows: np.ndarray, valid) -> tuple[np.ndarray, np.ndarray]:
    """Per validation list, the cross-entropy of the true candidate (chance: ln 20 = 3.00):
    the trained head's, and the retriever's alone."""
    base = retriever_log_softmax(valid.retriever_scores)
    labels = torch.as_tensor(valid.labels)
    with torch.no_grad():
        head = nn.functional.cross_entropy(
            module(torch.as_tensor(rows), base), labels, reduction="none"
        )
        alone = nn.functional.cross_entropy(base, labels, reduction="none")
    return head.numpy(), alone.numpy()
