"""Click-through statistics: a proportion's 95% interval and the two-proportion test.

Pure functions over counts, used by ``tandem variants report`` and the gateway's attribution
gauges. The interval is Wilson's (sane at 0 clicks and at small n, unlike the normal one);
the test is the pooled two-sided z-test every A/B tool reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy.stats import binomtest, norm


@dataclass(frozen=True)
class Proportion:
    """``successes / trials`` with its Wilson interval (NaNs when there are no trials)."""

    successes: int
    trials: int
    rate: float
    low: float
    high: float


def proportion(successes: int, trials: int, confidence: float = 0.95) -> Proportion:
    if not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes} of {trials}")
    if trials == 0:
        return Proportion(0, 0, math.nan, math.nan, math.nan)
    interval = binomtest(successes, trials).proportion_ci(confidence, method="wilson")
    rate = successes / trials
    return Proportion(successes, trials, rate, float(interval.low), float(interval.high))


@dataclass(frozen=True)
class ProportionTest:
    """A variant against the control: rate difference, z and two-sided p-value."""

    difference: float
    z: float
    p_value: float


def two_proportion_test(variant: Proportion, control: Proportion) -> ProportionTest:
    """Pooled two-sided z-test of ``variant.rate - control.rate`` (NaNs when undefined)."""
    if variant.trials == 0 or control.trials == 0:
        return ProportionTest(math.nan, math.nan, math.nan)
    difference = variant.rate - control.rate
    pooled = (variant.successes + control.successes) / (variant.trials + control.trials)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / variant.trials + 1 / control.trials))
    if spread == 0:
        return ProportionTest(difference, math.nan, math.nan if difference else 1.0)
    z = difference / spread
    return ProportionTest(difference, z, float(2 * norm.sf(abs(z))))
