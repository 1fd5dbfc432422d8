"""The arithmetic of `cai analyze`: edit distance, Cohen's κ, correlation, bootstrap intervals.

Plain Python and numpy, tested on hand-made inputs (``tests/core/test_analysis.py``). The
accumulators that stream run folders through these are in :mod:`core.analysis`.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np


def edit_distance(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Levenshtein distance between two token sequences (insertions, deletions, substitutions).

    Bit-parallel (Myers 1999, in Hyyrö's 2001 form for edit distance): one pass over ``b``
    with the columns of the dynamic-programming table packed into Python integers of
    ``len(a)`` bits, so two 256-token answers cost 256 steps of a few integer operations
    instead of 65,536 cell updates.
    """
    if len(a) < len(b):
        a, b = b, a
    m = len(a)
    if m == 0:
        return len(b)
    peq: dict[Hashable, int] = {}
    for i, token in enumerate(a):
        peq[token] = peq.get(token, 0) | (1 << i)
    full, top = (1 << m) - 1, 1 << (m - 1)
    pv, mv, score = full, 0, m
    for token in b:
        eq = peq.get(token, 0)
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = (mv | ~(xh | pv)) & full
        mh = pv & xh
        if ph & top:
            score += 1
        elif mh & top:
            score -= 1
        ph = ((ph << 1) | 1) & full
        mh = (mh << 1) & full
        pv = (mh | ~(xv | ph)) & full
        mv = ph & xv
    return score


def whitespace_tokens(text: str) -> list[str]:
    """The tokens when no tokenizer is at hand: words split on whitespace."""
    return text.split()


def cohen_kappa(n11, n10, n01, n00):
    """Cohen's κ of two raters' binary labels from their 2×2 table (element-wise on arrays).

    ``n10``: rater one says 1, rater two 0. κ = (p_o − p_e) / (1 − p_e), p_o the observed
    agreement and p_e the agreement expected from each rater's own rate of 1s. NaN where it is
    undefined: no items, or p_e = 1 (both raters gave one label throughout).
    """
    n11, n10, n01, n00 = (np.asarray(x, dtype=float) for x in (n11, n10, n01, n00))
    n = n11 + n10 + n01 + n00
    with np.errstate(invalid="ignore", divide="ignore"):
        observed = (n11 + n00) / n
        one, two = (n11 + n10) / n, (n11 + n01) / n
        expected = one * two + (1 - one) * (1 - two)
        kappa = (observed - expected) / (1 - expected)
    return np.where((n > 0) & (expected < 1 - 1e-12), kappa, np.nan)


def correlation(n, sx, sy, sxx, syy, sxy):
    """Pearson's r from running sums (element-wise on arrays); NaN where a side is constant."""
    n, sx, sy, sxx, syy, sxy = (np.asarray(x, dtype=float) for x in (n, sx, sy, sxx, syy, sxy))
    with np.errstate(invalid="ignore", divide="ignore"):
        var_x, var_y = n * sxx - sx * sx, n * syy - sy * sy
        r = (n * sxy - sx * sy) / np.sqrt(var_x * var_y)
    return np.where((n > 1) & (var_x > 1e-12 * n * n) & (var_y > 1e-12 * n * n), np.clip(r, -1, 1), np.nan)


def bootstrap_mean_ci(values: Sequence[float], *, resamples: int = 1000, level: float = 0.95,
                      seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean: ``resamples`` draws of ``len(values)`` with
    replacement from a generator seeded by ``seed``; None for fewer than two values."""
    data = np.asarray(values, dtype=float)
    if len(data) < 2:
        return None
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // len(data))  # bounded memory however many values
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        means[start:stop] = data[rng.integers(0, len(data), size=(stop - start, len(data)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def finite(value) -> float | None:
    """A float for JSON, None for NaN or infinity."""
    value = float(value)
    return value if math.isfinite(value) else None
