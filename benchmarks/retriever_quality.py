"""Retriever quality on MovieLens-100K: our SASRec and LRURec vs RecBole 1.2.1's SASRec (peer).

Protocol (the same for every model): chronological leave-one-out (last item test, second-last
validation), every rating an interaction, ranking against ALL 1,682 items with the user's
history and padding masked, Recall/NDCG/MRR at 5/10/20 over all 943 users, computed by
``tandem.evaluate`` from each model's score matrix. Each model gets a wall-clock budget and keeps
its best validation epoch.

The peer runs in its own venv (``artifacts/bench/recbole-venv``, created here: numpy<2,
pandas<3, recbole without ray) on the identical split: it reads our ordered interactions with
timestamps replaced by their position, so RecBole's time sort reproduces our order exactly. It
selects its epoch with its own validation (NDCG@10, RecBole's protocol), then scores the test
users with history masked by OUR code (its scores come back as a .npy matrix).

    .venv/bin/python benchmarks/retriever_quality.py [--minutes 10] [--peer-minutes 60]

This file is also the peer's entry point (``--peer``); that mode imports only recbole.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "artifacts" / "bench"
WORK = BENCH / "retriever_quality"
PEER_VENV = BENCH / "recbole-venv"
PEER_DATASET = "ml100k-tandem"
PEER_MAX_LEN = 50
PEER_PACKAGES = [
    "numpy<2",
    "pandas<3",
    "scipy",
    "tqdm",
    "colorlog==4.7.2",
    "colorama==0.4.4",
    "scikit-learn",
    "pyyaml",
    "tensorboard",
    "thop",
    "tabulate",
    "texttable",
    "psutil",
]
RESULTS = ROOT / "benchmarks" / "results"


# ----------------------------------------------------------------------------- our side


def ensure_peer_venv() -> Path:
    """Create the peer's venv once: torch first (the local CPU wheel), then recbole, no ray."""
    python = PEER_VENV / "bin" / "python"
    stamp = PEER_VENV / ".installed"
    if stamp.is_file():
        return python
    subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "--no-deps", "recbole==1.2.1"], check=True)
    subprocess.run([*pip, *PEER_PACKAGES], check=True)
    stamp.write_text("ok\n")
    return python


def export_for_peer(dataset, folder: Path) -> None:
    """Atomic files in OUR order: timestamp = position, so RecBole sorts into the same order."""
    folder.mkdir(parents=True, exist_ok=True)
    frame = dataset.interactions.frame
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    pairs = zip(frame["user_id"], frame["item_id"], strict=True)
    lines += [f"{user}\t{item}\t{n}" for n, (user, item) in enumerate(pairs)]
    (folder / f"{PEER_DATASET}.inter").write_text("\n".join(lines) + "\n")
    order = {"users": dataset.interactions.user_ids, "items": dataset.catalog.item_ids}
    (folder / "order.json").write_text(json.dumps(order))


def run_peer(dataset, minutes: float) -> dict:
    import numpy as np

    from tandem.evaluate import full_ranking_ranks
    from tandem.metrics import ranking_table

    python = ensure_peer_venv()
    data_dir = WORK / "peer-data"
    out_dir = WORK / "peer-out"
    out_dir.mkdir(parents=True, exist_ok=True)
    export_for_peer(dataset, data_dir / PEER_DATASET)
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "PYTHONPATH": ""}
    command = [str(python), __file__, "--peer", str(data_dir), str(out_dir), str(minutes)]
    subprocess.run(command, check=True, env=env, cwd=out_dir)
    report = json.loads((out_dir / "peer_report.json").read_text())
    scores = np.load(out_dir / "test_scores.npy")
    split = dataset.split()
    ranks = full_ranking_ranks(
        lambda batch: scores, split.test_inputs(), split.test_target, batch_size=len(scores)
    )
    report["test"] = ranking_table(ranks)
    return report


def run_ours(dataset, model: str, minutes: float) -> dict:
    from retriever.evaluation import evaluate_run
    from retriever.train import TrainConfig, train_retriever
    from tandem.artifacts import Manifest

    config = TrainConfig(model=model, max_minutes=minutes, max_epochs=1000)
    run_dir = train_retriever(dataset, config, WORK / "runs", progress=True)
    fit = Manifest.read(run_dir).metrics["fit"]
    return {
        "model": f"tandem {model}",
        "config": {**config.model_options(), "lr": config.lr, "batch_size": config.batch_size},
        "epochs": fit["epochs"],
        "best_epoch": fit["best_epoch"],
        "train_seconds": round(fit["seconds"], 1),
        "stopped_because": fit["stopped_because"],
        "valid_ndcg@10": Manifest.read(run_dir).metrics["valid"]["ndcg@10"],
        "test": evaluate_run(run_dir, "test").metrics,
        "run": str(run_dir.relative_to(ROOT)),
    }


def run_popularity(dataset) -> dict:
    import numpy as np

    from tandem.evaluate import evaluate_full_ranking

    split = dataset.split()
    counts = np.bincount(np.concatenate(split.train), minlength=dataset.catalog.num_items + 1)
    row = counts.astype(np.float32)[None]
    result = evaluate_full_ranking(
        lambda batch: np.repeat(row, len(batch), axis=0), split.test_inputs(), split.test_target
    )
    return {"model": "popularity (train counts)", "test": result.metrics}


def write_report(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    rows = [
        "| model | epochs (best) | train min | stop | R@5 | N@5 | M@5 | R@10 | N@10 | M@10 "
        "| R@20 | N@20 | M@20 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in results["models"]:
        m = entry["test"]
        epochs = f"{entry['epochs']} ({entry['best_epoch']})" if "epochs" in entry else "-"
        minutes = f"{entry['train_seconds'] / 60:.1f}" if "train_seconds" in entry else "-"
        cells = [
            f"{m[f'{name}@{k}']:.4f}" for k in (5, 10, 20) for name in ("recall", "ndcg", "mrr")
        ]
        rows.append(
            f"| {entry['model']} | {epochs} | {minutes} | {entry.get('stopped_because', '-')} | "
            + " | ".join(cells)
            + " |"
        )
    verdicts = "\n".join(f"- {line}" for line in results["verdicts"])
    text = f"""# Retriever quality (MovieLens-100K)

{__doc__.split("This file")[0].strip()}

Budgets: ours {results["budget_minutes"]} min each, peer {results["peer_budget_minutes"]} min.
Machine: {results["machine"]}.

{chr(10).join(rows)}

{verdicts}

Raw numbers: `{out.name}`. Reproduce: `.venv/bin/python benchmarks/retriever_quality.py`.
"""
    out.with_suffix(".md").write_text(text)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="budget per model of ours")
    parser.add_argument("--peer-minutes", type=float, default=60.0, help="budget for the peer")
    parser.add_argument("--models", default="sasrec,lrurec")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "retriever_quality.json")
    args = parser.parse_args(argv)

    from tandem.data import prepare_movielens_100k

    dataset = prepare_movielens_100k()
    started = time.time()
    load_before = os.getloadavg()
    models = [run_popularity(dataset)]
    for name in args.models.split(","):
        models.append(run_ours(dataset, name, args.minutes))
        print(json.dumps(models[-1], indent=2), flush=True)
    peer = None
    if not args.skip_peer:
        peer = run_peer(dataset, args.peer_minutes)
        models.append(peer)
        print(json.dumps(peer, indent=2), flush=True)
    verdicts = []
    if peer is not None:
        target = peer["test"]["ndcg@10"]
        for entry in models[1:-1]:
            ours = entry["test"]["ndcg@10"]
            word = "beats" if ours > target else "does NOT beat"
            verdicts.append(
                f"{entry['model']} {word} the peer on test NDCG@10: {ours:.4f} vs {target:.4f}"
            )
    results = {
        "benchmark": "retriever_quality",
        "dataset": dataset.summary.__dict__,
        "protocol": "leave-one-out, full ranking over all items, history + padding masked",
        "budget_minutes": args.minutes,
        "peer_budget_minutes": args.peer_minutes,
        "machine": (
            f"{os.cpu_count()} cores; load average {load_before[0]:.1f} at start, "
            f"{os.getloadavg()[0]:.1f} at end (other jobs shared the CPU)"
        ),
        "wall_minutes": round((time.time() - started) / 60, 1),
        "models": models,
        "verdicts": verdicts,
    }
    write_report(results, args.out)
    print("\n".join(verdicts))


# ----------------------------------------------------------------------------- peer side


def peer_main(data_dir: Path, out_dir: Path, minutes: float) -> None:
    """Runs INSIDE the peer venv: RecBole SASRec with a time budget, then test scores."""
    import numpy as np
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_seed

    config = Config(
        model="SASRec",
        dataset=PEER_DATASET,
        config_dict={
            "data_path": str(data_dir),
            "USER_ID_FIELD": "user_id",
            "ITEM_ID_FIELD": "item_id",
            "TIME_FIELD": "timestamp",
            "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
            "MAX_ITEM_LIST_LENGTH": PEER_MAX_LEN,
            "eval_args": {
                "split": {"LS": "valid_and_test"},
                "order": "TO",
                "mode": "full",
                "group_by": "user",
            },
            "train_neg_sample_args": None,
            "loss_type": "CE",
            "train_batch_size": 256,
            "metrics": ["Recall", "NDCG", "MRR"],
            "topk": [10],
            "valid_metric": "NDCG@10",
            "device": "cpu",
            "use_gpu": False,
            "seed": 2020,
            "reproducibility": True,
            "show_progress": False,
            "checkpoint_dir": str(out_dir),
        },
    )
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, _ = data_preparation(config, dataset)
    model = get_model(config["model"])(config, train_data._dataset).to("cpu")
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    started = time.monotonic()
    deadline = started + minutes * 60
    best, best_epoch, best_state, epochs, curve = -1.0, 0, None, 0, []
    patience = config["stopping_step"]
    while time.monotonic() < deadline and epochs - best_epoch < patience:
        loss = trainer._train_epoch(train_data, epochs, show_progress=False)
        epochs += 1
        score, _ = trainer._valid_epoch(valid_data, show_progress=False)
        curve.append({"epoch": epochs, "loss": float(loss), "valid_ndcg@10": float(score)})
        print(f"peer epoch {epochs}: loss {float(loss):.4f} valid NDCG@10 {score:.4f}", flush=True)
        if score > best:
            best, best_epoch = score, epochs
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    seconds = time.monotonic() - started
    model.load_state_dict(best_state)
    model.eval()

    order = json.loads((data_dir / PEER_DATASET / "order.json").read_text())
    rows = [
        line.split("\t")
        for line in (data_dir / PEER_DATASET / f"{PEER_DATASET}.inter").read_text().splitlines()[1:]
    ]
    sequences: dict[str, list[str]] = {}
    for user, item, _ in rows:
        sequences.setdefault(user, []).append(item)
    item_field = dataset.iid_field
    columns = np.array(
        [dataset.field2token_id[item_field].get(token, -1) for token in order["items"]]
    )
    scores = np.full((len(order["users"]), len(order["items"]) + 1), -np.inf, dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(order["users"]), 256):
            users = order["users"][start : start + 256]
            histories = [sequences[u][:-1][-PEER_MAX_LEN:] for u in users]
            seq = torch.zeros(len(users), PEER_MAX_LEN, dtype=torch.long)
            lengths = torch.tensor([len(h) for h in histories])
            for row, history in enumerate(histories):
                ids = dataset.token2id(item_field, history)
                seq[row, : len(ids)] = torch.as_tensor(ids)
            output = model.forward(seq, lengths)
            peer_scores = (output @ model.item_embedding.weight.T).numpy()
            block = np.full((len(users), len(columns)), -np.inf, dtype=np.float32)
            known = columns >= 0
            block[:, known] = peer_scores[:, columns[known]]
            scores[start : start + len(users), 1:] = block
    np.save(out_dir / "test_scores.npy", scores)
    report = {
        "model": "RecBole 1.2.1 SASRec (peer)",
        "config": {
            "MAX_ITEM_LIST_LENGTH": PEER_MAX_LEN,
            "train_batch_size": config["train_batch_size"],
            "hidden_size": config["hidden_size"],
            "n_layers": config["n_layers"],
            "dropout": config["hidden_dropout_prob"],
            "loss_type": config["loss_type"],
        },
        "epochs": epochs,
        "best_epoch": best_epoch,
        "train_seconds": round(seconds, 1),
        "stopped_because": "patience" if epochs - best_epoch >= patience else "time_budget",
        "valid_ndcg@10 (RecBole protocol, history not masked)": best,
        "curve": curve,
    }
    (out_dir / "peer_report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--peer":
        peer_main(Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4]))
    else:
        sys.path.insert(0, str(ROOT))
        main(sys.argv[1:])
