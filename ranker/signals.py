"""Candidate signals: what one candidate's soft token carries, so the LLM points, not computes.

A synthetic probe on this CPU showed a small LLM learns to *point* at the candidate whose own
token carries its evidence, but not to *compute* a user-item match across tokens (RECIPES.md).
So each candidate token is given the evidence explicitly, as one row:

    [ x_c | u * x_c[:d] | x_c * mean(x_h) | z(score) | log p(score) | rank | cos_last | cos_max ]

- ``x_c``: the candidate's item row: the retriever's item vector (first ``d`` dims, ``d`` = the
  user vector's size) and, when the run adds them, side features (popularity, year, genres);
- ``u * x_c[:d]``: the user-item interaction, whose sum is the retriever's own dot product;
- ``x_c * mean(x_h)``: agreement with the recent history (genres, era, taste);
- the retriever's score as a z-score within the list, its log-softmax and its rank;
- cosine to the last history item and the best cosine to the recent ones (item-item signals
  a sequence model blurs).

With ``relative`` every column is made relative to the list: centred over the candidates, each
vector group divided by one scale (so ``sum(u * x_c)`` stays the retriever's score, shifted) and
each scalar standardised. A listwise softmax only sees differences between candidates, and a
per-row layer norm (the projector's default) would rescale each candidate's evidence by its
own size, which blurs exactly the comparison the LLM must make.

``measures`` are quantities whose size means something across lists (``ranker.lifecycle``:
interactions so far, days since the first). The context group's one scale would let the other
columns' spread in each list decide theirs, so they are appended outside it, twice: centred
(the list's own spread kept) and standardised per column (the order within the list).
Cross-fitted on the teachers' lists, that form helped more than the group's (README, "Validation
loss ≤ 2.7").

Pure functions of their inputs: training, evaluation and serving call the same code.
"""

from __future__ import annotations

import numpy as np

RECENT = 5  # history items the item-item cosines look at
SCALARS = 5  # z-score, log-softmax, rank, cos_last, cos_max


def signal_dim(item_dim: int, user_dim: int) -> int:
    """Width of a candidate signal row for item rows of ``item_dim`` and users of ``user_dim``."""
    return 2 * item_dim + user_dim + SCALARS


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-8)


def candidate_signals(
    user: np.ndarray,
    candidates: np.ndarray,
    history: np.ndarray,
    scores: np.ndarray,
    context: np.ndarray | None = None,
    relative: bool = False,
    embeddings: bool = True,
    measures: np.ndarray | None = None,
) -> np.ndarray:
    """``[n, signal_dim]`` float32 rows for ``n`` candidates.

    ``user`` is the retriever's user vector ``[d]``; ``candidates`` and ``history`` are item rows
    ``[n, D]`` / ``[h, D]`` (history oldest first, may be empty) whose first ``d`` columns are the
    retriever's item vectors; ``scores`` the retriever's scores ``[n]``; ``context`` optional
    extra columns ``[n, k]`` appended as they are (``ranker.trends``); ``relative`` makes every
    column relative to the list (module docstring). Without ``embeddings`` the columns that
    live in one retriever's vector space are left out (``x_c``'s and the profile product's
    first ``d``, and ``u * x_c``): what is left (scores, side features, cosines, context)
    means the same under any retriever, so a ranker trained on a teacher retriever's lists
    can serve another's (``signal_dim(item_dim - user_dim, 0)`` columns). ``measures``
    (``[n, m]``, optional) add ``2 m`` columns: centred, and standardised per column, in either
    mode (module docstring).
    """
    user = np.asarray(user, dtype=np.float32)
    candidates = np.asarray(candidates, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float64)
    n, width = candidates.shape
    d = user.shape[0]
    if d > width:
        raise ValueError(f"user vector of size {d} but item rows of size {width}")
    if scores.shape != (n,):
        raise ValueError(f"{scores.shape[0]} retriever scores for {n} candidates")
    history = np.asarray(history, dtype=np.float32).reshape(-1, width)
    profile = history[-10:].mean(axis=0) if len(history) else np.zeros(width, np.float32)
    if len(history):
        cos = _unit(candidates[:, :d]) @ _unit(history[-RECENT:, :d]).T
        cos_last, cos_max = cos[:, -1], cos.max(axis=1)
    else:
        cos_last = cos_max = np.zeros(n, np.float32)
    scalars = np.concatenate([score_columns(scores), np.stack([cos_last, cos_max], 1)], axis=1)
    groups = [candidates, candidates[:, :d] * user, candidates * profile]
    if not embeddings:
        groups = [candidates[:, d:], np.zeros((n, 0), np.float32), (candidates * profile)[:, d:]]
    if context is not None:
        groups.append(np.asarray(context, dtype=np.float32).reshape(n, -1))
    if relative:
        groups = [_centred(g) / _rms(_centred(g)) if g.size else g for g in groups]
        scalars = relative_columns(scalars)
    parts = [*groups[:3], scalars.astype(np.float32), *groups[3:]]
    if measures is not None:
        measures = np.asarray(measures, dtype=np.float32).reshape(n, -1)
        parts += [_centred(measures), relative_columns(measures)]
    return np.concatenate(parts, axis=1).astype(np.float32)


def score_columns(scores: np.ndarray) -> np.ndarray:
    """``[n, 3]`` float64 for a list's scores ``[n]``: z-score, log-softmax (+ log n, clipped to
    +-10) and rank (0 = best, 1 = worst); non-finite scores count as the list's lowest."""
    n = len(scores)
    finite = np.where(np.isfinite(scores), scores, np.nan)
    fill = np.nanmin(finite) if np.isfinite(finite).any() else 0.0
    finite = np.nan_to_num(finite, nan=fill)
    z = (finite - finite.mean()) / (finite.std() + 1e-6)
    shifted = finite - finite.max()
    log_p = shifted - np.log(np.exp(shifted).sum()) + np.log(n)
    rank = np.argsort(np.argsort(-finite, kind="stable"), kind="stable") / max(n - 1, 1)
    return np.stack([z, np.clip(log_p, -10, 10), rank], axis=1)


def relative_columns(columns: np.ndarray) -> np.ndarray:
    """``[n, k]`` columns relative to the list: each centred and scaled by its own RMS."""
    return _centred(columns) / _rms(_centred(columns), axis=0)


def _centred(rows: np.ndarray) -> np.ndarray:
    return rows - rows.mean(axis=0, keepdims=True)


def _rms(rows: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Root mean square (over everything, or per column with ``axis=0``); 1 where it is 0, so
    a column constant over the list becomes 0, not NaN."""
    rms = np.sqrt(np.mean(np.square(rows, dtype=np.float64), axis=axis))
    return np.where(rms > 1e-8, rms, 1.0).astype(np.float32)


def side_features(
    genres: list[tuple[str, ...]], years: list[int | None], counts: np.ndarray
) -> np.ndarray:
    """``[num_items + 1, s]`` side rows (row 0 padding): log popularity, year, genre multi-hot.

    ``genres``/``years`` are per item in catalog order; ``counts`` are training interactions per
    item (``[num_items + 1]``, so validation and test items never leak into popularity). Each
    column is standardised over the items; a missing year is the mean (0 after scaling).
    """
    names = sorted({g for item in genres for g in item})
    num = len(genres)
    table = np.zeros((num + 1, 2 + len(names)), dtype=np.float32)
    pop = np.log1p(np.asarray(counts[1:], dtype=np.float64))
    table[1:, 0] = (pop - pop.mean()) / (pop.std() + 1e-6)
    known = np.array([y for y in years if y is not None], dtype=np.float64)
    if len(known):
        mean, std = known.mean(), known.std() + 1e-6
        table[1:, 1] = [0.0 if y is None else (y - mean) / std for y in years]
    column = {name: 2 + k for k, name in enumerate(names)}
    for row, item in enumerate(genres, start=1):
        for name in item:
            table[row, column[name]] = 1.0
    return table
