"""Cold-start calibration on a tiny synthetic world where content really predicts ID vectors.

Items have ID vectors with a shared popular direction; content is a noisy linear function of
them. A calibration that works puts held-out items where users find them; a broken one (no
spread, no map, wrong level) must fail these tests.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from enrichment.calibration import ColdStartCalibration, ProbeUsers, fit_calibration

ITEMS, DIM, CONTENT, USERS, K = 300, 8, 24, 400, 20


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(0)
    ids = rng.normal(size=(ITEMS + 1, DIM)) + 0.5  # + a shared "popular" direction
    ids[0] = 0.0
    mix = rng.normal(size=(DIM, CONTENT))
    content = ids @ mix + 0.3 * rng.normal(size=(ITEMS + 1, CONTENT))
    users = rng.normal(size=(USERS, DIM)) + 0.5
    scores = users @ ids.T
    scores[:, 0] = -np.inf
    histories = [np.argsort(-row)[1:4] for row in scores]  # three liked items, masked
    targets = np.argmax(np.where(np.isin(np.arange(ITEMS + 1), 0), -np.inf, scores), axis=1)
    rows = np.arange(1, ITEMS + 1)
    check = rows[rng.permutation(ITEMS)[:60]]
    fit = np.setdiff1d(rows, check)
    probes = ProbeUsers(users, targets, histories)
    return ids, content, fit, check, probes


def catalog_recall(ids, vectors, rows, probes) -> float:
    """Recall@K of ``rows`` (replaced by ``vectors``) for the probes whose target is one."""
    matrix = ids.copy()
    matrix[rows] = vectors
    scores = probes.vectors @ matrix.T
    scores[:, 0] = -np.inf
    for row, history in enumerate(probes.histories):
        scores[row, history] = -np.inf
    cases = np.flatnonzero(np.isin(probes.targets, rows))
    target = scores[cases, probes.targets[cases]]
    ranks = (scores[cases] > target[:, None]).sum(axis=1)
    return float((ranks < K).mean())


def test_calibrated_held_out_items_compete_at_catalog_level(world):
    ids, content, fit, check, probes = world
    calibration = fit_calibration(content, ids, fit, check, probes, max_warm_drop=1.0)
    random = K / ITEMS
    recall = catalog_recall(ids, calibration.apply(content[check]), check, probes)
    assert recall >= 2 * random
    assert calibration.pseudo_cold_recall == pytest.approx(recall)
    assert calibration.spread > 0


def test_a_broken_calibration_does_not_compete(world):
    ids, content, fit, check, probes = world
    good = fit_calibration(content, ids, fit, check, probes, max_warm_drop=1.0)
    random = K / ITEMS
    no_map = dataclasses.replace(good, spread=0.0)  # every cold item at the same point
    shuffled = dataclasses.replace(good, weight=good.weight[::-1].copy())  # the map garbled
    for broken in (no_map, shuffled):
        assert catalog_recall(ids, broken.apply(content[check]), check, probes) < 2 * random


def test_the_warm_drop_bound_is_respected_in_the_simulation(world):
    ids, content, fit, check, probes = world
    strict = fit_calibration(content, ids, fit, check, probes, max_warm_drop=0.0)
    assert strict.warm_ndcg_change >= 0.0


def test_calibration_round_trips_through_safetensors(world, tmp_path):
    ids, content, fit, check, probes = world
    calibration = fit_calibration(content, ids, fit, check, probes)
    calibration.save(tmp_path / "calibration.safetensors")
    loaded = ColdStartCalibration.load(tmp_path / "calibration.safetensors")
    np.testing.assert_allclose(loaded.apply(content[check]), calibration.apply(content[check]))
    assert loaded.summary() == calibration.summary()


def test_too_little_data_is_refused(world):
    ids, content, fit, check, probes = world
    with pytest.raises(ValueError, match="at least 2"):
        fit_calibration(content, ids, fit[:1], check, probes)
