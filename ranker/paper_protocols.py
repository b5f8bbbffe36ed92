"""The source papers' other ranker protocols, beside LlamaRec's two-stage one.

- LLaRA / RSLLM: HitRatio@1 over the test item + 19 random items. ValidRatio (the share of
  answers that name a real candidate) is 1 by construction: letter scoring always picks one.
- CIT-Rec: AUC of the test item against those 19 random negatives.
- CoT-Rec: MAPB, the mean absolute deviation of the test item's predicted rank as it is moved
  through all 20 positions, without and with permutation averaging.
- Prompt ablations on the hit users: text only; + preferences; + item soft tokens; + user
  token; and the base LLM zero-shot (no LoRA, text prompt).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ranker.core import Ranker, RankerConfig
from ranker.examples import sample_candidates
from ranker.train import TrainInputs
from ranker.two_stage import (
    Progress,
    UserSet,
    hit_inputs,
    rank_of,
    rounded,
    score_inputs,
    two_stage_ranks,
    user_input,
)
from ranker.verbalizer import MAX_CANDIDATES
from tandem.metrics import ranking_table, sampled_auc


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
    ranks = np.array([rank_of(s, y) for s, y in zip(scores, labels, strict=True)])
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
        ranks = np.array([rank_of(s, p) for p, s in enumerate(scores)], dtype=np.float64)
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


def with_config(ranker: Ranker, config: RankerConfig, backend=None) -> Ranker:
    """``ranker`` with another config (and backend): the projectors its prompt parts use."""
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


def prompt_ablations(ranker, zero_shot, inputs, users, hits, ks, stage, main) -> list[dict]:
    """One row per cumulative prompt variant on the hit users (``main``: the full config and its
    ranks, reused rather than scored again); ``zero_shot``, when given, adds the base LLM."""
    rows = []
    variants = _variants(ranker)
    if not variants:  # a signal-token prompt has no text part to ablate or run zero-shot
        return rows
    if zero_shot is not None:
        text = replace(variants[0][1], permutations=ranker.config.permutations)
        variants.insert(0, ("zero-shot (no LoRA), text", text))
    for name, variant in variants:
        backend = zero_shot.backend if name.startswith("zero-shot") else None
        model = with_config(ranker, variant, backend)
        if name == "+ preferences" and not inputs.preferences:
            rows.append({**rows[-1], "variant": name, "note": "no preference texts: as above"})
            continue
        if backend is None and variant == main[0]:
            ranks = main[1]
        else:
            scores = score_inputs(
                model, hit_inputs(inputs, users, hits), stage(f"ablation: {name}", len(hits))
            )
            ranks = two_stage_ranks(users, hits, scores)
        on_hits = ranking_table(ranks[hits], ks)
        overall = ranking_table(ranks, ks)
        rows.append(
            {
                "variant": name,
                "ranker_on_retrieved": rounded(on_hits),
                "two_stage": rounded(overall),
            }
        )
    return rows
