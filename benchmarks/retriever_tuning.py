"""Retriever tuning on MovieLens-100K: every configuration selected on VALIDATION only.

Each configuration trains with ``retriever.train.fit`` (full softmax, AdamW, the best
validation epoch kept, patience ``--patience``) and is scored on the validation targets with
history masked (``tandem.evaluate``). The sweep varies one factor at a time around each model's
default: weight decay, dropout, learning rate, ``max_len`` (50, as the peer, against 200), heads
and hidden size. Then the best SASRec and the best LRURec are fused, ``w * s_sasrec + (1 - w) *
s_lrurec`` on raw inner products, with ``w`` tuned on validation. That fusion is one inner
product with concatenated vectors (``[w u_s, (1 - w) u_l] . [i_s, i_l]``), so one Faiss index
could serve it. Test figures are computed for the chosen configuration only.

    .venv/bin/python benchmarks/retriever_tuning.py [--only lrurec] [--threads 1]

Results are appended to ``benchmarks/results/retriever_tuning.json`` as each configuration
finishes, and a rerun skips the ones already there (the sweep resumes after an interruption).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
WEIGHTS = ROOT / "artifacts" / "bench" / "retriever_tuning"

# name -> (model, overrides of TrainConfig). One factor at a time around the defaults.
SWEEP: dict[str, tuple[str, dict]] = {  # the most promising first: a sweep may be cut short
    "lrurec default": ("lrurec", {}),
    "sasrec dropout 0.5": ("sasrec", {"dropout": 0.5}),
    "lrurec dropout 0.4": ("lrurec", {"dropout": 0.4}),
    "sasrec default": ("sasrec", {}),
    "lrurec weight decay 0.1": ("lrurec", {"weight_decay": 0.1}),
    "sasrec weight decay 0.1": ("sasrec", {"weight_decay": 0.1}),
    "lrurec max_len 50": ("lrurec", {"max_len": 50}),
    "sasrec max_len 50": ("sasrec", {"max_len": 50}),
    "lrurec hidden 128": ("lrurec", {"hidden": 128}),
    "sasrec hidden 128": ("sasrec", {"hidden": 128}),
    "lrurec dropout 0.1": ("lrurec", {"dropout": 0.1}),
    "lrurec lr 1e-3": ("lrurec", {"lr": 1e-3}),
    "sasrec lr 1e-3": ("sasrec", {"lr": 1e-3}),
    "sasrec heads 1": ("sasrec", {"heads": 1}),
}


def train_one(dataset, split, model_name: str, overrides: dict, args) -> tuple[dict, object]:
    import torch

    from retriever.models import build_model
    from retriever.train import TrainConfig, fit

    config = replace(
        TrainConfig(model=model_name, max_minutes=args.minutes, patience=args.patience),
        **overrides,
    )
    torch.manual_seed(config.seed)
    model = build_model(config.model, dataset.catalog.num_items, config.model_options())
    report = fit(model, split, config, progress=False)
    best = report.curve[report.best_epoch - 1]
    entry = {
        "model": model_name,
        "overrides": overrides,
        "config": {**config.model_options(), "lr": config.lr, "weight_decay": config.weight_decay},
        "valid_ndcg@10": report.best_valid["ndcg@10"],
        "valid": report.best_valid,
        "epochs": report.epochs,
        "best_epoch": report.best_epoch,
        "stopped_because": report.stopped_because,
        "train_minutes": round(report.seconds / 60, 2),
        "minutes_to_best": round(best["seconds"] / 60, 2),
        "cpu_minutes_to_best": round(best["cpu_seconds"] / 60, 2),
        "budget_minutes": args.minutes,
        "threads": args.threads,
        "load_average": round(os.getloadavg()[0], 2),
        "curve": report.curve,
    }
    return entry, model


def scores_of(model, histories: list[np.ndarray]) -> np.ndarray:
    from retriever.scoring import torch_score_fn

    score = torch_score_fn(model)
    return np.concatenate(
        [score(histories[i : i + 256]) for i in range(0, len(histories), 256)]
    ).astype(np.float32)


def ndcg10_per_user(scores: np.ndarray, histories, targets) -> np.ndarray:
    from tandem.evaluate import full_ranking_ranks
    from tandem.metrics import ndcg_per_user

    ranks = full_ranking_ranks(lambda b: scores, histories, targets, batch_size=len(scores))
    return ndcg_per_user(ranks, 10)


def ndcg10(scores: np.ndarray, histories, targets) -> float:
    return float(ndcg10_per_user(scores, histories, targets).mean())


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="budget per configuration")
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--only", default=None, help="run only names starting with this")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", type=Path, default=RESULTS / "retriever_tuning.json")
    parser.add_argument(
        "--export-run",
        action="store_true",
        help="save the best single model as a retriever run (ONNX, Faiss, manifest; latest)",
    )
    args = parser.parse_args(argv)

    import torch
    from safetensors.torch import load_file, save_file

    from retriever.models import build_model
    from retriever.train import TrainConfig
    from tandem.data import prepare_movielens_100k
    from tandem.metrics import paired_bootstrap_ci

    torch.set_num_threads(args.threads)
    dataset = prepare_movielens_100k()
    split = dataset.split()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"configs": {}}
    results["protocol"] = (
        "ML-100K leave-one-out; selection on validation NDCG@10 (full ranking over all items, "
        f"history masked); patience {args.patience}; each row's wall-clock cap in its entry"
    )
    WEIGHTS.mkdir(parents=True, exist_ok=True)
    for name, (model_name, overrides) in SWEEP.items():
        if name in results["configs"] or (args.only and not name.startswith(args.only)):
            continue
        entry, model = train_one(dataset, split, model_name, overrides, args)
        save_file(model.state_dict(), str(WEIGHTS / f"{name.replace(' ', '_')}.safetensors"))
        results["configs"][name] = entry
        args.out.write_text(json.dumps(results, indent=2))
        print(f"{name}: valid NDCG@10 {entry['valid_ndcg@10']:.4f} ({entry})", flush=True)

    def best_of(model_name: str) -> str | None:
        names = [n for n, e in results["configs"].items() if e["model"] == model_name]
        return max(names, key=lambda n: results["configs"][n]["valid_ndcg@10"], default=None)

    def load(name: str):
        """A configuration's weights; retrained (same seed) when an earlier session's are gone
        (artifacts do not always survive), leaving its recorded entry as it was."""
        entry = results["configs"][name]
        path = WEIGHTS / f"{name.replace(' ', '_')}.safetensors"
        if not path.is_file():
            print(f"{name}: weights missing, retraining them", flush=True)
            retrained, model = train_one(dataset, split, entry["model"], entry["overrides"], args)
            save_file(model.state_dict(), str(path))
            entry["retrained_valid_ndcg@10"] = retrained["valid_ndcg@10"]
        config = replace(TrainConfig(model=entry["model"]), **entry["overrides"])
        model = build_model(config.model, dataset.catalog.num_items, config.model_options())
        model.load_state_dict(load_file(str(path)))
        return model

    best_sasrec, best_lrurec = best_of("sasrec"), best_of("lrurec")
    bests = [n for n in (best_sasrec, best_lrurec) if n]
    candidates = {n: results["configs"][n]["valid_ndcg@10"] for n in bests}
    valid_in, valid_target = split.valid_inputs(), split.valid_target
    started = time.time()
    if best_sasrec and best_lrurec:
        models = {n: load(n) for n in (best_sasrec, best_lrurec)}
        s_valid = {n: scores_of(m, valid_in) for n, m in models.items()}
        curve = {}
        for w in np.round(np.linspace(0, 1, 11), 2):
            fused = w * s_valid[best_sasrec] + (1 - w) * s_valid[best_lrurec]
            curve[float(w)] = ndcg10(fused, valid_in, valid_target)
        w_best = max(curve, key=curve.get)
        single = max(bests, key=lambda n: results["configs"][n]["valid_ndcg@10"])
        fused = w_best * s_valid[best_sasrec] + (1 - w_best) * s_valid[best_lrurec]
        low, high = paired_bootstrap_ci(
            ndcg10_per_user(fused, valid_in, valid_target),
            ndcg10_per_user(s_valid[single], valid_in, valid_target),
        )
        results["ensemble_vs_best_single_on_valid"] = {
            "single": single,
            "ci95": [round(low, 5), round(high, 5)],
        }
        results["ensemble"] = {
            "members": [best_sasrec, best_lrurec],
            "valid_ndcg@10_by_sasrec_weight": curve,
            "sasrec_weight": w_best,
            "valid_ndcg@10": curve[w_best],
        }
        candidates["ensemble"] = curve[w_best]
    # Does a tuned configuration beat its model's default on validation, beyond noise? (A
    # default changes only then.) Paired bootstrap over the validation users.
    results["vs_default_on_valid"] = {}
    for name in bests:
        default = f"{results['configs'][name]['model']} default"
        if name == default or default not in results["configs"]:
            continue
        tuned, base = (
            ndcg10_per_user(scores_of(load(n), valid_in), valid_in, valid_target)
            for n in (name, default)
        )
        low, high = paired_bootstrap_ci(tuned, base)
        results["vs_default_on_valid"][name] = {
            "ndcg@10_diff": round(float(tuned.mean() - base.mean()), 5),
            "ci95": [round(low, 5), round(high, 5)],
        }
    chosen = max(candidates, key=candidates.get)
    test_in, test_target = split.test_inputs(), split.test_target
    if chosen == "ensemble":
        w = results["ensemble"]["sasrec_weight"]
        test_scores = w * scores_of(models[best_sasrec], test_in) + (1 - w) * scores_of(
            models[best_lrurec], test_in
        )
    else:
        test_scores = scores_of(load(chosen), test_in)
    results["chosen"] = {
        "name": chosen,
        "valid_ndcg@10": candidates[chosen],
        "test_ndcg@10": ndcg10(test_scores, test_in, test_target),
        "selection_seconds": round(time.time() - started, 1),
    }
    if args.export_run:  # the best single model: one the retriever service can serve today
        single = max(bests, key=lambda n: results["configs"][n]["valid_ndcg@10"])
        run = export_run(dataset, split, results["configs"][single], load(single))
        results["exported_run"] = {"name": single, "run": str(run)}
    args.out.write_text(json.dumps(results, indent=2))
    write_markdown(results, args.out.with_suffix(".md"))
    print(json.dumps(results["chosen"], indent=2))


def export_run(dataset, split, entry: dict, model) -> Path:
    """The tuned model as a servable retriever run, without training it again."""
    from retriever.artifacts import save_run
    from retriever.train import FitReport, TrainConfig
    from tandem.paths import artifacts_root

    config = replace(TrainConfig(model=entry["model"]), **entry["overrides"])
    report = FitReport(
        epochs=entry["epochs"],
        best_epoch=entry["best_epoch"],
        best_valid=entry["valid"],
        seconds=entry["train_minutes"] * 60,
        stopped_because=entry["stopped_because"],
        curve=entry.get("curve", []),
    )
    return save_run(model, dataset, split, config, report, artifacts_root())


def write_markdown(results: dict, out: Path) -> None:
    rows = [
        "| configuration | valid NDCG@10 | epochs (best) | stop | min | min to best "
        "| CPU min to best |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in sorted(results["configs"].items(), key=lambda kv: -kv[1]["valid_ndcg@10"]):
        rows.append(
            f"| {name} | {e['valid_ndcg@10']:.4f} | {e['epochs']} ({e['best_epoch']}) | "
            f"{e['stopped_because']} | {e['train_minutes']} | {e['minutes_to_best']} | "
            f"{e['cpu_minutes_to_best']} |"
        )
    ensemble = results.get("ensemble")
    if ensemble:
        rows.append(
            f"| ensemble of {' + '.join(ensemble['members'])}, SASRec weight "
            f"{ensemble['sasrec_weight']} | {ensemble['valid_ndcg@10']:.4f} | - | - | - | - | - |"
        )
    chosen = results["chosen"]
    pair = results.get("ensemble_vs_best_single_on_valid")
    versus = "\n".join(
        f"- {name} vs its model's default on validation: NDCG@10 {v['ndcg@10_diff']:+.4f}, "
        f"paired bootstrap 95% interval [{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}]"
        for name, v in results.get("vs_default_on_valid", {}).items()
    )
    if pair:
        versus += (
            f"\n- the ensemble vs {pair['single']} on validation: paired bootstrap 95% interval "
            f"of the NDCG@10 difference [{pair['ci95'][0]:+.4f}, {pair['ci95'][1]:+.4f}]"
        )
    out.write_text(
        f"""# Retriever tuning (MovieLens-100K)

{__doc__.split("    .venv")[0].strip()}

Protocol: {results["protocol"]}.

{chr(10).join(rows)}

{versus}

Chosen on validation: **{chosen["name"]}** (valid NDCG@10 {chosen["valid_ndcg@10"]:.4f}); its
test NDCG@10 over all 943 users: **{chosen["test_ndcg@10"]:.4f}** (the only test figure here).

Raw numbers: `{out.with_suffix(".json").name}`. Reproduce: `.venv/bin/python
benchmarks/retriever_tuning.py`.
"""
    )


if __name__ == "__main__":
    main(sys.argv[1:])
