"""Two-stage evaluation of a ranker run: one JSON-ready report with the papers' protocols.

LlamaRec / MLLM4Rec's two-stage protocol (``ranker.two_stage``): retriever alone, the ranker
alone on the users it could help ("hits"), the two-stage system over all users, and the fused
score of ``ranker.fusion`` (what the gateway serves) with its weight tuned on validation users;
then the other papers' protocols (``ranker.paper_protocols``): HitRatio@1 and AUC over random
candidates, MAPB, prompt ablations. ``evaluate_two_stage`` loads a run and its inputs first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np

from ranker.core import Ranker, base_llm_dir
from ranker.head import HeadRanker
from ranker.paper_protocols import mapb, prompt_ablations, random_candidate_metrics, with_config
from ranker.train import TrainInputs
from ranker.two_stage import (
    Progress,
    fused_two_stage_ranks,
    hit_inputs,
    paired_comparison,
    retrieve,
    rounded,
    sample_users,
    score_inputs,
    tune_fusion,
    two_stage_ranks,
)
from tandem.metrics import ranking_table


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
    # the weight the fused figures are measured at instead of the tuned one: what a ranker is
    # served at (its manifest's weight) beside a retriever it was not tuned with; None = tuned
    fusion_weight: float | None = None
    seed: int = 0


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
    users = retrieve(inputs, sample_users(num_users, config.max_users, config.seed), config.split)
    hits = users.hits
    ks = tuple(config.ks)
    report: dict = {
        "protocol": {**asdict(config), "ranker": asdict(ranker.config)},
        "users": len(users.users),
        "retrieved_users": len(hits),
        "retriever": rounded(ranking_table(users.retriever_ranks, (*ks, 20))),
    }
    on_hits = hit_inputs(inputs, users, hits)
    tokens = [len(ranker.render_all(inp)[0][0].token_ids) for inp in on_hits[:50]]
    report["mean_prompt_tokens"] = round(float(np.mean(tokens)), 1) if tokens else 0.0
    t0 = time.perf_counter()
    scores = score_inputs(
        ranker, on_hits, stage("ranker on retrieved users", passes(len(hits), ranker))
    )
    report["ranker_seconds_per_user"] = round((time.perf_counter() - t0) / max(len(hits), 1), 3)
    ranks = two_stage_ranks(users, hits, scores)
    retriever_hit_ranks = np.array(
        [int(np.flatnonzero(users.top[r] == users.targets[r])[0]) for r in hits], dtype=np.int64
    )
    report["retriever_on_retrieved"] = rounded(ranking_table(retriever_hit_ranks, ks))
    report["ranker_on_retrieved"] = rounded(ranking_table(ranks[hits], ks))
    report["two_stage"] = rounded(ranking_table(ranks, ks))

    if config.fusion_users:
        valid = retrieve(
            inputs, sample_users(num_users, config.fusion_users, config.seed + 1), "valid"
        )
        valid_scores = score_inputs(
            ranker,
            hit_inputs(inputs, valid, valid.hits),
            stage("fusion weight on validation", passes(len(valid.hits), ranker)),
        )
        tuned, curve = tune_fusion(valid, valid.hits, valid_scores)
        weight = tuned if config.fusion_weight is None else config.fusion_weight
        fused = fused_two_stage_ranks(users, hits, scores, weight)
        valid_gain = paired_comparison(
            fused_two_stage_ranks(valid, valid.hits, valid_scores, weight),
            valid.retriever_ranks,
            config.seed,
        )
        report["fused"] = {
            "weight": tuned,
            "valid_users": len(valid.users),
            "valid_ndcg@10_by_weight": curve,
            "valid_gain_ci95": valid_gain["ndcg10_diff_ci95"],
            **({} if config.fusion_weight is None else {"fixed_weight": weight}),
            # what the gateway would serve: the weight only when its validation gain is real
            "served_weight": weight if valid_gain["ndcg10_diff_ci95"][0] > 0 else 0.0,
            **rounded(ranking_table(fused, ks)),
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
        plain = with_config(ranker, replace(ranker.config, permutations=1, shuffle=False))
        shuffled = with_config(
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
        report["ablations"] = prompt_ablations(
            ranker, zero_shot, inputs, users, hits, ks, stage, main=(ranker.config, ranks)
        )
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


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
    fusion_weight: float | None = None,
) -> dict:
    """Evaluate a ranker run end to end (what ``tandem evaluate --stage two`` prints).

    ``run`` is a ranker run (or its kind folder); ``zero_shot`` evaluates the bare LLM with the
    newest retriever instead. ``retriever_run`` serves another retriever than the one the run
    trained on (a ranker whose prompt reads no retriever-space vectors, trained on a teacher's
    lists); ``fusion_weight`` measures the fused figures at that weight (the one it is served
    at) instead of the validation-tuned one. The report goes to ``json_out`` and, when the run
    was served with its own retriever, into the run's manifest (``report["stored_in"]``): an
    evaluation beside another retriever is not the run's own record. FileNotFoundError /
    ValueError when a run, its inputs or the LLM is missing or does not fit.
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
        ranker = with_config(ranker, replace(ranker.config, permutations=permutations))
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
        fusion_weight=fusion_weight,
    )
    report = evaluate(ranker, inputs, config, zero_shot=base, on_stage=on_stage)
    report["ranker_run"] = str(run_dir) if run_dir else "zero-shot"
    report["inputs"] = runs.to_parents()
    if runs.retriever is not None:  # which retriever, by content: a rebuild may reproduce it
        report["retriever_files"] = Manifest.read(runs.retriever).files
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
