"""Two-stage evaluation: retriever top-20 -> LLM ranker, with the papers' protocols.

- LlamaRec / MLLM4Rec: every evaluated user's test item; the retriever ranks ALL items (history
  masked) and hands its top-20 in retriever order to the ranker. A user whose test item was not
  retrieved is a miss for the two-stage system. Reported: retriever alone, ranker alone on the
  users it could help ("hits"), the two-stage system over all users, and the fused score of
  ``ranker.fusion`` (what the gateway serves) with its weight tuned on validation users.
- LLaRA / RSLLM: HitRatio@1 over the test item + 19 random items. ValidRatio (the share of
  answers that name a real candidate) is 1 by construction: letter scoring always picks one.
- CIT-Rec: AUC of the test item against those 19 random negatives.
- CoT-Rec: MAPB, the mean absolute deviation of the test item's predicted rank as it is moved
  through all 20 positions, without and with permutation averaging.
- Ablations on the hit users: text only; + preferences; + item soft tokens; + user token; and
  the base LLM zero-shot (no LoRA, text prompt).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

from ranker.core import Ranker, RankerConfig, base_llm_dir
from ranker.demographics import attributes_of
from ranker.examples import prompt_input, sample_candidates
from ranker.fusion import fuse, tune_weight
from ranker.head import HeadRanker
from ranker.prompts import PromptInput
from ranker.train import TrainInputs
from ranker.verbalizer import MAX_CANDIDATES, to_candidate_order
from tandem.evaluate import masked_scores
from tandem.metrics import (
    ndcg_per_user,
    paired_bootstrap_ci,
    ranking_table,
    ranks_from_scores,
    sampled_auc,
)

Progress = Callable[[int], None]


@dataclass(frozen=True)
class EvalConfig:
    split: str = "test"  # "test" (history + validation item) or "valid"
    max_users: int | None = None  # a seeded sample of users; None = all
    ks: tuple[int, ...] = (5, 10)
    ablations: bool = True
    random_candidates: bool = True  # HitRatio@1 and AUC over the target + 19 random items
    mapb_users: int = 8  # CoT-Rec MAPB costs 20 passes per user and order
    mapb_permutations: int = 3  # orders averaged in the "with shuffling" MAPB
    fusion_users: int = 943  # validation users that tune the fusion weight (0 = no fusion)
    seed: int = 0


@dataclass
class UserSet:
    """Users under evaluation with their histories, targets and retriever results."""

    users: np.ndarray
    histories: list[np.ndarray]
    targets: np.ndarray
    vectors: np.ndarray | None
    top: np.ndarray  # [U, 20] retriever order
    times: np.ndarray  # decision time per user: when the last history item was consumed
    top_scores: np.ndarray
    retriever_ranks: np.ndarray  # among all items, history masked

    @property
    def hits(self) -> np.ndarray:
        return np.flatnonzero((self.top == self.targets[:, None]).any(axis=1))


def _sample_users(num_users: int, max_users: int | None, seed: int) -> np.ndarray:
    users = np.arange(num_users)
    if max_users is not None and max_users < num_users:
        users = np.sort(np.random.default_rng(seed).choice(num_users, max_users, replace=False))
    return users


def retrieve(inputs: TrainInputs, users: np.ndarray, split: str) -> UserSet:
    """Retriever full ranking (history masked, target kept) and its top-20 per user."""
    data = inputs.dataset.split()
    all_histories = data.test_inputs() if split == "test" else data.valid_inputs()
    targets = (data.test_target if split == "test" else data.valid_target)[users]
    histories = [all_histories[u] for u in users]
    source = inputs.source
    if source is None:
        raise ValueError("two-stage evaluation needs the retriever run")
    vectors = source.user_vectors(histories)
    scores = vectors @ source.item_table.T
    masked_scores(scores, histories, targets)
    ranks = ranks_from_scores(scores, targets)
    top, top_scores = source.top_k(histories, MAX_CANDIDATES, vectors)
    all_times = inputs.dataset.interactions.timestamps()
    last = -2 if split == "test" else -3  # the validation item, or the last training item
    times = np.array([all_times[u][last] for u in users], dtype=np.float64)
    return UserSet(users, histories, targets, vectors, top, times, top_scores, ranks)


def score_inputs(
    ranker: Ranker, inputs: Sequence[PromptInput], progress: Progress | None = None
) -> list[np.ndarray]:
    """Candidate-order log-probs of many inputs, through the ranker's backend in batches."""
    rendered = [ranker.render_all(inp) for inp in inputs]
    flat = [p for prompts, _ in rendered for p in prompts]
    backend = ranker.backend
    chunk = getattr(getattr(backend, "config", None), "max_batch", 8)
    scores: list[np.ndarray] = []
    for start in range(0, len(flat), chunk):
        batch = flat[start : start + chunk]
        if hasattr(backend, "score_sync"):
            scores.extend(backend.score_sync(batch))
        else:
            import asyncio

            scores.extend(asyncio.run(backend.score(batch)))
        if progress is not None:
            progress(len(batch))
    out, at = [], 0
    for prompts, orders in rendered:
        out.append(to_candidate_order(np.stack(scores[at : at + len(prompts)]), orders))
        at += len(prompts)
    return out


def _rank_of(scores: np.ndarray, target: int) -> int:
    """0-based rank of candidate ``target`` (pessimistic on ties)."""
    value = scores[target]
    return int((scores > value).sum() + (scores == value).sum() - 1)


def user_input(inputs: TrainInputs, users: UserSet, r: int, candidates: np.ndarray) -> PromptInput:
    """User row ``r`` with ``candidates`` in the given order, and their retriever scores."""
    ids = inputs.dataset.interactions.user_ids
    vector = None if users.vectors is None else users.vectors[r]
    scores = None if vector is None else inputs.source.scores(vector, candidates)
    return prompt_input(
        inputs.features,
        users.histories[r],
        candidates,
        inputs.preferences.get(ids[users.users[r]]),
        vector,
        scores,
        float(users.times[r]),
        attributes_of(inputs.dataset.profile(ids[users.users[r]])),
    )


def _hit_inputs(inputs: TrainInputs, users: UserSet, rows: np.ndarray) -> list[PromptInput]:
    return [user_input(inputs, users, r, users.top[r]) for r in rows]


def _two_stage_ranks(users: UserSet, rows: np.ndarray, scores: list[np.ndarray]) -> np.ndarray:
    """Per user: the ranker's rank of the target for hits, -1 (a miss) otherwise."""
    ranks = np.full(len(users.users), -1, dtype=np.int64)
    for r, row_scores in zip(rows, scores, strict=True):
        position = int(np.flatnonzero(users.top[r] == users.targets[r])[0])
        ranks[r] = _rank_of(row_scores, position)
    return ranks


def _fused_ranks(users: UserSet, rows, scores, weight: float) -> np.ndarray:
    fused = [fuse(users.top_scores[r], s, weight) for r, s in zip(rows, scores, strict=True)]
    return _two_stage_ranks(users, rows, fused)


def tune_fusion(users: UserSet, rows: np.ndarray, scores: list[np.ndarray]) -> tuple[float, dict]:
    """The weight with the best validation NDCG@10 (ties: the smaller weight)."""
    from tandem.metrics import ndcg_at_k

    return tune_weight(lambda w: ndcg_at_k(_fused_ranks(users, rows, scores, w), 10))


def random_candidate_metrics(
    ranker: Ranker, inputs: TrainInputs, users: UserSet, seed: int, progress: Progress | None
) -> dict:
    """HitRatio@1 (LLaRA/RSLLM) and AUC (CIT-Rec) over the target + 19 random items."""
    prompts, labels = [], []
    for r, (user, history, target) in enumerate(
        zip(users.users, users.histories, users.targets, strict=True)
    ):
        rng = np.random.default_rng([seed, int(user)])
        candidates, label = sample_candidates(
            rng,
            int(target),
            history,
            np.zeros(0, np.int64),
            inputs.dataset.catalog.num_items,
            hard_ratio=0.0,
        )
        prompts.append(user_input(inputs, users, r, candidates))
        labels.append(label)
    ranker_hr, ranker_auc = _hit_ratio_and_auc(score_inputs(ranker, prompts, progress), labels)
    report = {
        "hit_ratio@1": ranker_hr,
        "valid_ratio": 1.0,
        "auc": ranker_auc,
        "chance_hit_ratio@1": 0.05,
        "users": len(labels),
    }
    if all(p.retriever_scores is not None for p in prompts):  # the teacher on the same lists
        retriever = [np.asarray(p.retriever_scores, dtype=np.float64) for p in prompts]
        hr, auc = _hit_ratio_and_auc(retriever, labels)
        report |= {"retriever_hit_ratio@1": hr, "retriever_auc": auc}
    return report


def _hit_ratio_and_auc(scores: list[np.ndarray], labels: list[int]) -> tuple[float, float]:
    ranks = np.array([_rank_of(s, y) for s, y in zip(scores, labels, strict=True)])
    target = np.array([s[y] for s, y in zip(scores, labels, strict=True)])
    negatives = np.stack([np.delete(s, y) for s, y in zip(scores, labels, strict=True)])
    return round(float((ranks == 0).mean()), 4), round(sampled_auc(target, negatives), 4)


def mapb(ranker: Ranker, inputs: TrainInputs, users: UserSet, rows: np.ndarray, progress) -> float:
    """CoT-Rec's Mean Absolute Position Bias: the target moved through every position."""
    biases = []
    for r in rows:
        target = users.targets[r]
        others = [int(i) for i in users.top[r] if i != target][: MAX_CANDIDATES - 1]
        prompts = []
        for position in range(len(others) + 1):
            candidates = np.array([*others[:position], target, *others[position:]])
            prompts.append(user_input(inputs, users, r, candidates))
        scores = score_inputs(ranker, prompts, progress)
        ranks = np.array([_rank_of(s, p) for p, s in enumerate(scores)], dtype=np.float64)
        biases.append(np.abs(ranks - ranks.mean()).mean())
    return round(float(np.mean(biases)), 4) if biases else float("nan")


def _variants(ranker: Ranker) -> list[tuple[str, RankerConfig]]:
    """Cumulative prompt ablations this ranker can run (parts it has projectors for); none for
    a signal-token ranker, whose prompt has no text part to ablate."""
    base = ranker.config.prompt
    if base.candidate_signals:
        return []
    text = replace(base, preference=False, item_soft_tokens=False, user_soft_token=False)
    steps = [("text only", text), ("+ preferences", replace(text, preference=True))]
    if ranker.projectors.get("item") is not None:
        steps.append(("+ item soft tokens", replace(steps[-1][1], item_soft_tokens=True)))
    if ranker.projectors.get("user") is not None:
        steps.append(("+ user token", replace(steps[-1][1], user_soft_token=True)))
    return [(name, replace(ranker.config, prompt=prompt)) for name, prompt in steps]


def _with_config(ranker: Ranker, config: RankerConfig, backend=None) -> Ranker:
    return Ranker(
        ranker.tokens,
        config,
        backend or ranker.backend,
        ranker.projectors.get("item") if config.prompt.item_soft_tokens else None,
        ranker.projectors.get("user") if config.prompt.user_soft_token else None,
        ranker.projectors.get("candidate") if config.prompt.candidate_signals else None,
        ranker.item_table,
        ranker.tables,
    )


def evaluate(
    ranker: Ranker,
    inputs: TrainInputs,
    config: EvalConfig = EvalConfig(),
    *,
    zero_shot: Ranker | None = None,
    on_stage: Callable[[str, int], Progress] | None = None,
) -> dict:
    """The full report (a JSON-ready dict). ``zero_shot`` is the base LLM for the ablation.

    ``on_stage(name, total_prompts)`` returns a progress callback for that stage.
    """
    started = time.perf_counter()

    def stage(name: str, total: int) -> Progress | None:
        return on_stage(name, total) if on_stage is not None else None

    def passes(n_inputs: int, r: Ranker) -> int:
        return n_inputs * r.config.permutations

    num_users = inputs.dataset.split().num_users
    users = retrieve(inputs, _sample_users(num_users, config.max_users, config.seed), config.split)
    hits = users.hits
    ks = tuple(config.ks)
    report: dict = {
        "protocol": {**asdict(config), "ranker": asdict(ranker.config)},
        "users": len(users.users),
        "retrieved_users": len(hits),
        "retriever": _rounded(ranking_table(users.retriever_ranks, (*ks, 20))),
    }
    hit_inputs = _hit_inputs(inputs, users, hits)
    tokens = [len(ranker.render_all(inp)[0][0].token_ids) for inp in hit_inputs[:50]]
    report["mean_prompt_tokens"] = round(float(np.mean(tokens)), 1) if tokens else 0.0
    t0 = time.perf_counter()
    scores = score_inputs(
        ranker, hit_inputs, stage("ranker on retrieved users", passes(len(hits), ranker))
    )
    report["ranker_seconds_per_user"] = round((time.perf_counter() - t0) / max(len(hits), 1), 3)
    ranks = _two_stage_ranks(users, hits, scores)
    retriever_hit_ranks = np.array(
        [int(np.flatnonzero(users.top[r] == users.targets[r])[0]) for r in hits], dtype=np.int64
    )
    report["retriever_on_retrieved"] = _rounded(ranking_table(retriever_hit_ranks, ks))
    report["ranker_on_retrieved"] = _rounded(ranking_table(ranks[hits], ks))
    report["two_stage"] = _rounded(ranking_table(ranks, ks))

    if config.fusion_users:
        valid = retrieve(
            inputs, _sample_users(num_users, config.fusion_users, config.seed + 1), "valid"
        )
        valid_scores = score_inputs(
            ranker,
            _hit_inputs(inputs, valid, valid.hits),
            stage("fusion weight on validation", passes(len(valid.hits), ranker)),
        )
        weight, curve = tune_fusion(valid, valid.hits, valid_scores)
        fused = _fused_ranks(users, hits, scores, weight)
        valid_gain = paired_comparison(
            _fused_ranks(valid, valid.hits, valid_scores, weight),
            valid.retriever_ranks,
            config.seed,
        )
        report["fused"] = {
            "weight": weight,
            "valid_users": len(valid.users),
            "valid_ndcg@10_by_weight": curve,
            "valid_gain_ci95": valid_gain["ndcg10_diff_ci95"],
            # what the gateway would serve: the weight only when its validation gain is real
            "served_weight": weight if valid_gain["ndcg10_diff_ci95"][0] > 0 else 0.0,
            **_rounded(ranking_table(fused, ks)),
        }
        report |= paired_comparison(fused, users.retriever_ranks, config.seed)

    if config.random_candidates:
        report["random_candidates"] = random_candidate_metrics(
            ranker,
            inputs,
            users,
            config.seed,
            stage("HitRatio@1 / AUC (random 20)", passes(len(users.users), ranker)),
        )

    if config.mapb_users and len(hits):
        rows = hits[: config.mapb_users]
        plain = _with_config(ranker, replace(ranker.config, permutations=1, shuffle=False))
        shuffled = _with_config(
            ranker,
            replace(ranker.config, permutations=config.mapb_permutations, shuffle=True),
        )
        report["mapb"] = {
            "users": len(rows),
            "without_shuffling": mapb(plain, inputs, users, rows, stage("MAPB", len(rows) * 20)),
            f"with_shuffling_{config.mapb_permutations}_orders": mapb(
                shuffled,
                inputs,
                users,
                rows,
                stage("MAPB (shuffled)", len(rows) * 20 * config.mapb_permutations),
            ),
        }

    if config.ablations and len(hits):
        report["ablations"] = _ablations(
            ranker, zero_shot, inputs, users, hits, ks, stage, main=(ranker.config, ranks)
        )
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def _ablations(ranker, zero_shot, inputs, users, hits, ks, stage, main) -> list[dict]:
    rows = []
    variants = _variants(ranker)
    if not variants:  # a signal-token prompt has no text part to ablate or run zero-shot
        return rows
    if zero_shot is not None:
        text = replace(variants[0][1], permutations=ranker.config.permutations)
        variants.insert(0, ("zero-shot (no LoRA), text", text))
    for name, variant in variants:
        backend = zero_shot.backend if name.startswith("zero-shot") else None
        model = _with_config(ranker, variant, backend)
        if name == "+ preferences" and not inputs.preferences:
            rows.append({**rows[-1], "variant": name, "note": "no preference texts: as above"})
            continue
        if backend is None and variant == main[0]:
            ranks = main[1]
        else:
            scores = score_inputs(
                model, _hit_inputs(inputs, users, hits), stage(f"ablation: {name}", len(hits))
            )
            ranks = _two_stage_ranks(users, hits, scores)
        on_hits = ranking_table(ranks[hits], ks)
        overall = ranking_table(ranks, ks)
        rows.append(
            {
                "variant": name,
                "ranker_on_retrieved": _rounded(on_hits),
                "two_stage": _rounded(overall),
            }
        )
    return rows


def paired_comparison(fused_ranks: np.ndarray, retriever_ranks: np.ndarray, seed: int) -> dict:
    """Fused two-stage vs the retriever on the same users: NDCG@10 difference, its paired
    bootstrap 95% interval, and the relative gain."""
    fused = ndcg_per_user(fused_ranks, 10)
    base = ndcg_per_user(retriever_ranks, 10)
    lo, hi = paired_bootstrap_ci(fused, base, seed=seed)
    return {
        "ndcg10_diff": round(float(fused.mean() - base.mean()), 5),
        "ndcg10_diff_ci95": [round(lo, 5), round(hi, 5)],
        "ndcg10_ratio": round(float(fused.mean() / max(base.mean(), 1e-12)), 4),
    }


def _rounded(table: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in table.items()}


def evaluate_two_stage(
    run=None,
    dataset: str = "ml-100k",
    split: str = "test",
    json_out=None,
    *,
    llm=None,
    max_users: int | None = None,
    zero_shot: bool = False,
    ablations: bool = True,
    random_candidates: bool = True,
    mapb_users: int = 8,
    fusion_users: int = 943,
    permutations: int | None = None,
    precision: str = "auto",
    batch_size: int = 8,
    threads: int | None = None,
    on_stage: Callable[[str, int], Progress] | None = None,
    retriever_run=None,
) -> dict:
    """Evaluate a ranker run end to end (what ``tandem evaluate --stage two`` prints).

    ``run`` is a ranker run (or its kind folder); ``zero_shot`` evaluates the bare LLM with the
    newest retriever instead. ``retriever_run`` serves another retriever than the one the run
    trained on (a ranker whose prompt reads no retriever-space vectors, trained on a teacher's
    lists). The report goes to ``json_out`` and, when the run was served with its own
    retriever, into the run's manifest (``report["stored_in"]``): an evaluation beside another
    retriever is not the run's own record. FileNotFoundError / ValueError when a run, its
    inputs or the LLM is missing or does not fit.
    """
    import json
    from pathlib import Path

    import torch

    from ranker.inputs import InputRuns, load_inputs, resolve_inputs
    from tandem.artifacts import Manifest, resolve_run, runs_dir
    from tandem.data import Dataset
    from tandem.paths import artifacts_root, dataset_dir

    root = artifacts_root()
    llm_dir = Path(llm) if llm else root / "llm"
    if threads:
        torch.set_num_threads(threads)
    run_dir = None
    data = Dataset.load(dataset_dir(dataset))
    if zero_shot:
        runs = resolve_inputs(root, dataset)
    else:
        run_dir = resolve_run(Path(run) if run else runs_dir(root, dataset, "ranker"))
        runs = InputRuns.from_parents(Manifest.read(run_dir).parents)
    if retriever_run is not None:
        runs = replace(runs, retriever=resolve_run(Path(retriever_run)))
    inputs = load_inputs(data, runs)
    if llm is None:
        llm_dir = base_llm_dir(run_dir, llm_dir)
    options = {"precision": precision, "max_batch": batch_size}
    ranker = Ranker.load(run_dir, llm_dir, **options)
    if retriever_run is not None and ranker.config.prompt.reads_retriever_space:
        raise ValueError(
            f"{run_dir} reads its retriever's vectors (user token or signal embeddings): it "
            "can only be evaluated with the retriever it was trained with"
        )
    head = isinstance(ranker, HeadRanker)  # no prompt text to ablate, no order to permute
    if permutations and not head:
        ranker = _with_config(ranker, replace(ranker.config, permutations=permutations))
    base = None
    backend_config = getattr(ranker.backend, "config", None)
    if run_dir is not None and getattr(backend_config, "adapter_dir", None):
        base = Ranker.load(None, llm_dir, **options)
    config = EvalConfig(
        split=split,
        max_users=max_users,
        ablations=ablations and not head,
        random_candidates=random_candidates,
        mapb_users=0 if head else mapb_users,
        fusion_users=fusion_users,
    )
    report = evaluate(ranker, inputs, config, zero_shot=base, on_stage=on_stage)
    report["ranker_run"] = str(run_dir) if run_dir else "zero-shot"
    report["inputs"] = runs.to_parents()
    if run_dir is not None:
        trained = Manifest.read(run_dir)
        report["examples_seen"] = trained.metrics.get("examples")
        report["recipe"] = trained.config.get("train") or trained.config.get("head")
        if retriever_run is None:
            trained.metrics[f"two_stage_{split}"] = report
            trained.write(run_dir)
            report["stored_in"] = str(run_dir / "manifest.json")
    if json_out is not None:
        json_out = Path(json_out)
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2))
    return report
