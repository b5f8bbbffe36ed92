"""Which ranker the gateway serves, at what fusion weight, and the one line that says why.

Defaults never harm: a ranker run serves at the weight it tuned on validation, and a run that
did not beat retriever order there (weight 0), or no run at all, leaves the retriever's order
in place; ``TANDEM_RANK_WEIGHT`` overrides both. The note is logged at start-up and carried in
every response's ``model.ranker_note``.
"""

from __future__ import annotations

from pathlib import Path


def tuned_rank_weight(run: Path | None) -> float | None:
    """The ``rank_weight`` a ranker run's manifest records, if any (training tunes it)."""
    from tandem.artifacts import Manifest

    if run is None or not (run / "manifest.json").is_file():
        return None
    weight = Manifest.read(run).metrics.get("rank_weight")
    return float(weight) if weight is not None else None


def rank_weight(configured: float | None, tuned: float | None) -> float:
    """The configured weight first; else the one the ranker run tuned; else 0 (retriever order).

    Defaults never harm: a ranker that has not been shown to help on validation (no run, or a
    run whose tuned weight is 0) is not served unless TANDEM_RANK_WEIGHT asks for it.
    """
    if configured is not None:
        return configured
    return tuned if tuned is not None else 0.0


def ranker_note(configured: float | None, tuned: float | None, run: Path | None) -> str:
    """One line saying which ranker is served and why (logged at start-up, in every response)."""
    if configured is not None:
        return f"TANDEM_RANK_WEIGHT={configured} (configured), ranker run {_name(run)}"
    if run is None:
        return "off: no trained ranker run; answers keep the retriever's order"
    name = run_id(run)
    if tuned is None:
        return f"off: ranker run {name} has no validation-tuned weight; retriever order"
    if tuned == 0.0:
        return f"off: ranker run {name} did not beat retriever order on validation (weight 0)"
    return f"ranker run {name} at weight {tuned}, tuned on validation"


def run_id(run: Path) -> str:
    """A ranker run's id from its manifest (a shipped copy lives in models/ranker but keeps the
    id it was trained as); the folder name when there is no manifest."""
    from tandem.artifacts import Manifest

    if (run / "manifest.json").is_file():
        return Manifest.read(run).run_id
    return run.name


def _name(run: Path | None) -> str:
    return run_id(run) if run is not None else "none (zero-shot LLM)"
