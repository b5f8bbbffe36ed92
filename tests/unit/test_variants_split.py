"""Variants configuration and user assignment: shares honoured, stable, reshuffled by the salt;
bad configurations refused with a message that says what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from scipy.stats import kendalltau

from feature_store.splits import Split, SplitVariant
from services.common.settings import GatewaySettings
from services.common.variants import VariantsConfig
from services.gateway.shadow import kendall_tau

USERS = [f"u{n}" for n in range(10_000)]


def split(shares: dict[str, float], salt: str = "s1", **extra) -> Split:
    variants = tuple(SplitVariant(name=n, share=s) for n, s in shares.items())
    return Split(salt=salt, control=next(iter(shares)), variants=variants, **extra)


def observed(s: Split) -> dict[str, float]:
    names = [s.assign(u) for u in USERS]
    return {n: names.count(n) / len(USERS) for n in s.names}


@pytest.mark.parametrize(
    "shares",
    [{"a": 0.5, "b": 0.5}, {"a": 0.9, "b": 0.1}, {"a": 0.7, "b": 0.2, "c": 0.1}, {"a": 1.0}],
)
def test_shares_are_honoured_within_two_points_on_10k_users(shares: dict[str, float]):
    got = observed(split(shares))
    assert max(abs(got[n] - share) for n, share in shares.items()) <= 0.02, got


def test_a_user_keeps_their_variant_until_the_split_changes():
    first, again = split({"a": 0.5, "b": 0.5}), split({"a": 0.5, "b": 0.5})
    assert [first.assign(u) for u in USERS] == [again.assign(u) for u in USERS]
    # growing b from 10% to 20% moves only users from a to b, never the other way
    small, large = split({"a": 0.9, "b": 0.1}), split({"a": 0.8, "b": 0.2})
    moved = [(small.assign(u), large.assign(u)) for u in USERS]
    assert all(after == "b" for before, after in moved if before == "b")
    assert 0.07 < sum(before != after for before, after in moved) / len(USERS) < 0.13


def test_a_new_salt_reshuffles_users():
    old, new = split({"a": 0.5, "b": 0.5}, "s1"), split({"a": 0.5, "b": 0.5}, "s2")
    changed = sum(old.assign(u) != new.assign(u) for u in USERS) / len(USERS)
    assert 0.45 < changed < 0.55  # independent halves: about half the users change


def test_shadows_and_zero_shares_are_never_assigned():
    s = Split(
        salt="x",
        control="a",
        variants=(
            SplitVariant(name="a", share=1.0),
            SplitVariant(name="b", share=0.0),
            SplitVariant(name="s", shadow=True),
        ),
    )
    assert {s.assign(u) for u in USERS[:2000]} == {"a"} and s.shadows == ["s"]


def test_promote_makes_the_variant_the_control_at_full_traffic():
    s = Split(
        salt="x",
        control="a",
        variants=(
            SplitVariant(name="a", share=0.9),
            SplitVariant(name="b", share=0.1),
            SplitVariant(name="s", shadow=True),
        ),
    )
    promoted = s.promoted("s")
    assert promoted.control == "s" and promoted.variant("s") == SplitVariant(name="s", share=1.0)
    assert {v.name: v.share for v in promoted.variants} == {"a": 0.0, "b": 0.0, "s": 1.0}
    assert {promoted.assign(u) for u in USERS[:1000]} == {"s"}
    with pytest.raises(ValueError, match="no variant 'zz'"):
        s.promoted("zz")


@pytest.mark.parametrize(
    ("variants", "message"),
    [
        ([{"name": "a", "share": 0.5}, {"name": "b", "share": 0.4}], "must sum to 1"),
        ([{"name": "a", "share": 0.5}, {"name": "a", "share": 0.5}], "unique"),
        (
            [
                {"name": "a", "share": 0.5, "control": True},
                {"name": "b", "share": 0.5, "control": True},
            ],
            "only one variant can be the control",
        ),
        ([{"name": "a", "share": 1.0}, {"name": "s", "share": 0.1, "shadow": True}], "shadow"),
        ([{"name": "a", "share": 1.0, "prompt": {"colour": "red"}}], "unknown prompt field"),
        ([{"name": "a", "share": 1.0, "backend": "inprocess", "adapter": "rec-v2"}], "vllm"),
        ([{"name": "A b", "share": 1.0}], "pattern"),
        ([{"name": "a", "share": 1.0, "shadow": True}], "shadow"),
    ],
)
def test_bad_configurations_are_refused_with_what_is_wrong(variants: list, message: str):
    with pytest.raises(ValidationError, match=message):
        VariantsConfig.model_validate({"variants": variants})


def test_variants_come_from_env_json_or_a_yaml_file(monkeypatch, tmp_path: Path):
    config = {"salt": "s", "variants": [{"name": "a", "share": 0.25}, {"name": "b",
              "share": 0.75, "control": True, "rank_weight": 0.3}]}  # fmt: skip
    monkeypatch.setenv("TANDEM_VARIANTS", json.dumps(config))
    from_env = GatewaySettings(_env_file=None).variants
    assert from_env is not None and from_env.control == "b" and from_env.names == ["a", "b"]
    monkeypatch.delenv("TANDEM_VARIANTS")
    file = tmp_path / "variants.yaml"
    file.write_text("salt: s\nvariants:\n  - {name: a, share: 0.25}\n"
                    "  - {name: b, share: 0.75, control: true, rank_weight: 0.3}\n")  # fmt: skip
    assert GatewaySettings(_env_file=None, variants_file=file).variants == from_env
    assert GatewaySettings(_env_file=None).variants is None  # unset: one implicit variant
    file.write_text("variants:\n  - {name: a, share: 0.6}\n")
    with pytest.raises(ValidationError, match=r"variants\.yaml.*must sum to 1"):
        GatewaySettings(_env_file=None, variants_file=file)


def test_kendall_tau_matches_scipy_and_handles_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.normal(size=20), rng.normal(size=20)
        assert kendall_tau(a, b) == pytest.approx(kendalltau(a, b).statistic)
    tied = np.array([1.0, 1.0, 2.0, 3.0, 3.0])
    assert kendall_tau(tied, [5, 4, 3, 2, 1]) == pytest.approx(kendalltau(tied, [5, 4, 3, 2, 1])[0])
    assert kendall_tau([1, 2, 3], [1, 2, 3]) == 1.0 and kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    assert np.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))


def test_metric_labels_are_only_configured_names_or_the_overflow_value():
    from prometheus_client import generate_latest

    from services.common.metrics import GatewayMetrics

    metrics = GatewayMetrics(variants=["a", "b"])
    metrics.observe_stage("total", 0.01, "a")
    metrics.observe_stage("total", 0.01, "not-configured")
    metrics.fallback("cold_start", "also-not")
    text = generate_latest(metrics.registry).decode()
    labels = {
        line.split('variant="')[1].split('"')[0]
        for line in text.splitlines()
        if 'variant="' in line
    }
    assert labels == {"a", "b", "other"}
    assert 'tandem_fallbacks_total{reason="cold_start",variant="other"} 1.0' in text
