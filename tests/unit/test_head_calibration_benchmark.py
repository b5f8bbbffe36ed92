"""The calibration benchmark's training column never counts a list's own target, even where
the teachers' overlapping positions repeat that list (benchmarks/ranker_head_item_calibration)."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def calibration(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the benchmarks import their siblings
    return importlib.import_module("ranker_head_item_calibration")


def _lists(rng: np.random.Generator, users: int, per_user: int, size: int):
    """Random lists of 20 over ``size - 1`` items; each user's first list appears twice, as
    two teachers holding out the same position would show it (same candidates and target)."""
    n = users * per_user
    items = np.stack([rng.choice(np.arange(1, size), 20, replace=False) for _ in range(n)])
    base = np.log(rng.dirichlet(np.ones(20), n))
    labels = rng.integers(0, 20, n)
    owners = np.repeat(np.arange(users), per_user)
    first = np.arange(0, n, per_user)
    items[first + 1], base[first + 1], labels[first + 1] = items[first], base[first], labels[first]
    return items, base, labels, owners


def test_leaving_each_user_out_matches_a_table_counted_without_that_user(calibration):
    rng = np.random.default_rng(0)
    size = 60
    items, base, labels, owners = _lists(rng, users=6, per_user=4, size=size)
    table = calibration.calibration_table(items, base, labels, size)
    column = calibration.calibration_column(table, items, base, 0.5, labels, owners)
    for n in range(len(items)):
        others = owners != owners[n]
        hits, expected = calibration.calibration_table(
            items[others], base[others], labels[others], size
        )
        want = np.log((hits[items[n]] + 0.5) / (expected[items[n]] + 0.5))
        np.testing.assert_allclose(column[n, :, 0], want, rtol=1e-5, atol=1e-5)


def test_leaving_only_the_list_out_still_counts_its_repeated_target(calibration):
    rng = np.random.default_rng(1)
    size = 60
    items, base, labels, owners = _lists(rng, users=6, per_user=4, size=size)
    table = calibration.calibration_table(items, base, labels, size)
    own_list = calibration.calibration_column(table, items, base, 0.5, labels)
    own_user = calibration.calibration_column(table, items, base, 0.5, labels, owners)
    first = np.arange(0, len(items), 4)
    target = labels[first]
    # the repeated list's target keeps the copy's hit when only the list itself is left out
    assert np.all(own_list[first, target, 0] > own_user[first, target, 0])
