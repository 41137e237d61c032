"""Every statistic the study reports, in one place, on SciPy wherever SciPy has the function.

The report (seed-to-seed intervals, gains, the Pareto front) and the search (promotions, halving against the
grid) both draw on this module, so a number means the same wherever it is shown. Inputs are lists of
accuracies that may hold ``None`` or NaN for runs that produced none; those are dropped, never read as zero.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats as sps

PERCENT = (0.0, 100.0)  # where an accuracy in % can lie
PERCENT_GAIN = (-100.0, 100.0)  # where a difference of two of them can lie
NOISE_UNMEASURABLE = "unmeasurable: no spread on a side (every seed of it gave the same top-1)"


def finite(values: Any) -> list[float]:
    """The finite numbers among ``values`` (None, NaN, inf and non-numbers are left out)."""
    out = []
    for v in values if values is not None else []:
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out.append(f)
    return out


def t_quantile(p: float, df: float) -> float:
    """Quantile ``p`` of Student's t with ``df`` degrees of freedom (NaN when df is not a positive number)."""
    if df is None or not math.isfinite(df) or df <= 0:
        return math.nan
    return float(sps.t.ppf(p, df))


def mean_ci(values: Any, confidence: float = 0.95, bounds: tuple[float, float] | None = None) -> dict[str, float]:
    """Mean, sample std (ddof=1) and the t confidence interval of the mean.

    With one value the std and CI are NaN (one seed says nothing about seed noise); with none, all are NaN. With
    no spread (every value alike, as a small validation set's coarse accuracy steps give) the CI is NaN too: zero
    spread measures no noise, it does not show there is none.
    ``bounds`` (e.g. ``PERCENT``) clips the interval to where the quantity can lie: the clipped interval still
    holds the true mean whenever the t interval does, so its coverage is unchanged (``ci_half`` stays the t one).
    """
    xs = np.asarray(finite(values))
    n, nan = len(xs), math.nan
    out = {"n": n, "mean": float(xs.mean()) if n else nan, "std": nan, "ci_lo": nan, "ci_hi": nan, "ci_half": nan}
    if n < 2:
        return out
    std = float(xs.std(ddof=1))
    if std == 0:
        return out | {"std": std}
    half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    lo, hi = _clip(out["mean"] - half, out["mean"] + half, bounds)
    return out | {"std": std, "ci_lo": lo, "ci_hi": hi, "ci_half": half}


def _clip(lo: float, hi: float, bounds: tuple[float, float] | None) -> tuple[float, float]:
    if bounds is None:
        return lo, hi
    return min(max(lo, bounds[0]), bounds[1]), max(min(hi, bounds[1]), bounds[0])


def welch_gain(
    variant: Any, baseline: Any, confidence: float = 0.95, bounds: tuple[float, float] | None = None
) -> dict[str, Any]:
    """Gain ``mean(variant) - mean(baseline)`` with Welch's (unequal-variance) t interval, from SciPy.

    ``significant`` is True/False when the CI excludes/includes 0, and None when it cannot be computed: fewer
    than two finite values on a side, or no spread on a side (every seed of it gave the same top-1, as a small
    validation set's coarse accuracy steps can). Zero spread measures no noise, it does not show there is none:
    Welch's interval would take that side as noise-free and come out too narrow, so that case has no CI either
    and ``noise`` says why (None when the CI was computed).
    ``bounds`` (e.g. ``PERCENT_GAIN``) clips the interval as in ``mean_ci``; significance is decided before.
    """
    a, b = finite(variant), finite(baseline)
    nan = math.nan
    out: dict[str, Any] = {"gain": nan, "ci_lo": nan, "ci_hi": nan, "df": nan, "significant": None}
    out |= {"n": len(a), "n_baseline": len(b), "noise": "unknown: fewer than 2 seeds on a side"}
    if not a or not b:
        return out
    out["gain"] = float(np.mean(a) - np.mean(b))
    if len(a) < 2 or len(b) < 2:
        return out
    if np.var(a) == 0 or np.var(b) == 0:
        return out | {"noise": NOISE_UNMEASURABLE}
    res = sps.ttest_ind(a, b, equal_var=False)
    ci = res.confidence_interval(confidence)
    lo, hi, df = float(ci.low), float(ci.high), float(res.df)
    significant = bool(lo > 0 or hi < 0)
    lo, hi = _clip(lo, hi, bounds)
    return out | {"ci_lo": lo, "ci_hi": hi, "df": df, "significant": significant, "noise": None}


def bonferroni(confidence: float, comparisons: int) -> float:
    """The per-comparison confidence level that keeps ``confidence`` over ``comparisons`` tests (best of many)."""
    return 1 - (1 - confidence) / max(int(comparisons), 1)


def binomial_ci(top1_pct: float, n_images: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson interval (in %) of an accuracy measured on ``n_images`` validation images (SciPy's binomtest).

    It shows the validation sample's noise only: one run says nothing about seed-to-seed noise.
    """
    n = int(n_images)
    k = min(max(round(float(top1_pct) / 100 * n), 0), n)
    ci = sps.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return 100 * float(ci.low), 100 * float(ci.high)


def pareto_mask(cost: Any, value: Any, minimize_cost: bool = True) -> list[bool]:
    """Which points are Pareto-optimal: no other point is at least as good on both axes and better on one.

    ``cost`` is minimized (or maximized when ``minimize_cost`` is False, e.g. throughput); ``value``
    (accuracy) is maximized. Points with a missing coordinate are never on the front.
    """
    c = np.array([math.nan if x is None else float(x) for x in cost], dtype=float)
    v = np.array([math.nan if x is None else float(x) for x in value], dtype=float)
    if len(c) != len(v):
        raise ValueError(f"cost has {len(c)} points and value {len(v)}; they must pair up")
    c = c if minimize_cost else -c
    ok = np.isfinite(c) & np.isfinite(v)
    # dominated[i, j]: point j is at least as good as i on both axes and better on one
    no_worse = (c[None, :] <= c[:, None]) & (v[None, :] >= v[:, None])
    better = (c[None, :] < c[:, None]) | (v[None, :] > v[:, None])
    dominated = (no_worse & better & ok[None, :]).any(axis=1)
    return [bool(x) for x in ok & ~dominated]
