"""Means and ratios of means with their standard errors (over windows, for the evaluator)."""

from __future__ import annotations

import math


def mean_se(values: list[float]) -> tuple[float, float]:
    """The mean and its standard error (NaN with fewer than two values)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def ratio_se(numerators: list[float], denominators: list[float]) -> tuple[float, float]:
    """Ratio of means with a delta-method standard error."""
    n = len(numerators)
    a, b = sum(numerators) / n, sum(denominators) / n
    ratio = a / b if b else float("nan")
    if n < 2 or not b:
        return ratio, float("nan")
    var_a = sum((x - a) ** 2 for x in numerators) / (n - 1)
    var_b = sum((y - b) ** 2 for y in denominators) / (n - 1)
    cov = sum((x - a) * (y - b) for x, y in zip(numerators, denominators)) / (n - 1)
    return ratio, math.sqrt(max(0.0, (var_a - 2 * ratio * cov + ratio**2 * var_b) / n)) / abs(b)
