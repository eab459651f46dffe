"""Uncertainty for evaluations: bootstrap intervals, permutation p-values, standard errors.

Pure numpy, seeded, no model library. ``a`` is the baseline sample (e.g. the base model's rewards)
and ``b`` the treatment (the trained adapter's); every difference is ``mean(b) - mean(a)``.

Completions of an evaluation are grouped by prompt, with the same number per prompt for both
models. Passing ``strata_a``/``strata_b`` (e.g. prompt ids) resamples and permutes *within* each
prompt: the prompt mix stays the one that was evaluated, so the interval and p-value measure the
sampling noise of the completions given those prompts, and prompt-to-prompt differences (which
both models share) do not widen them. Without strata, the two samples are treated as simple random
samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class DiffCI(NamedTuple):
    """Difference of means ``mean(b) - mean(a)`` and its percentile bootstrap interval."""

    diff: float
    low: float
    high: float


def _finite_1d(x: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds non-finite values; drop failed samples first")
    return arr


def mean_se(x: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the mean (sample sd with ddof=1, over sqrt(n)); se is NaN for n=1."""
    arr = _finite_1d(x, "x")
    se = float(arr.std(ddof=1) / np.sqrt(arr.size)) if arr.size > 1 else float("nan")
    return float(arr.mean()), se


def _strata(strata: Sequence | np.ndarray | None, n: int, name: str) -> np.ndarray:
    if strata is None:
        return np.zeros(n, dtype=np.int64)
    arr = np.asarray(strata)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have one label per value ({n}), got shape {arr.shape}")
    return arr


def _check_strata(sa: np.ndarray, sb: np.ndarray) -> list:
    labels = sorted(set(sa.tolist()) | set(sb.tolist()), key=str)
    missing = [s for s in labels if not (np.any(sa == s) and np.any(sb == s))]
    if missing:
        raise ValueError(f"strata {missing[:5]} occur in only one of the two samples; "
                         "a stratified comparison needs both models in every stratum")
    return labels


def _resample_indices(rng: np.random.Generator, members: np.ndarray, n_boot: int) -> np.ndarray:
    """(n_boot, len(members)) indices drawn with replacement from ``members``."""
    return members[rng.integers(0, members.size, size=(n_boot, members.size))]


def _bootstrap_means(
    xa: np.ndarray,
    xb: np.ndarray,
    n_boot: int,
    seed: int,
    strata_a: Sequence | np.ndarray | None,
    strata_b: Sequence | np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(n_boot,) resampled means of ``a`` and of ``b`` (within strata when given)."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    sa, sb = _strata(strata_a, xa.size, "strata_a"), _strata(strata_b, xb.size, "strata_b")
    rng = np.random.default_rng(seed)
    if strata_a is None and strata_b is None:
        idx_a = _resample_indices(rng, np.arange(xa.size), n_boot)
        idx_b = _resample_indices(rng, np.arange(xb.size), n_boot)
    else:
        labels = _check_strata(sa, sb)
        idx_a = np.concatenate([_resample_indices(rng, np.flatnonzero(sa == s), n_boot) for s in labels], axis=1)
        idx_b = np.concatenate([_resample_indices(rng, np.flatnonzero(sb == s), n_boot) for s in labels], axis=1)
    return xa[idx_a].mean(axis=1), xb[idx_b].mean(axis=1)


def _percentile_interval(replicates: np.ndarray, level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(replicates, [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap_diff_ci(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    n_boot: int = 10000,
    seed: int = 0,
    level: float = 0.95,
    strata_a: Sequence | np.ndarray | None = None,
    strata_b: Sequence | np.ndarray | None = None,
) -> DiffCI:
    """``mean(b) - mean(a)`` with a percentile bootstrap interval at ``level``.

    Each replicate resamples ``a`` and ``b`` independently with replacement (within strata when
    given, keeping every stratum's size) and takes the difference of the resampled means; the
    interval is the (1-level)/2 and (1+level)/2 quantiles of the replicates (numpy's default
    linear interpolation).
    """
    xa, xb = _finite_1d(a, "a"), _finite_1d(b, "b")
    mean_a, mean_b = _bootstrap_means(xa, xb, n_boot, seed, strata_a, strata_b)
    low, high = _percentile_interval(mean_b - mean_a, level)  # checks level
    return DiffCI(float(xb.mean() - xa.mean()), low, high)


def bootstrap_percent_change_ci(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    n_boot: int = 10000,
    seed: int = 0,
    level: float = 0.95,
    strata_a: Sequence | np.ndarray | None = None,
    strata_b: Sequence | np.ndarray | None = None,
) -> DiffCI:
    """``100 * (mean(b) - mean(a)) / |mean(a)|`` (percent change from the baseline) and its interval.

    The figure the published experiment reported ("+150 % Broca"). Same resampling as
    ``bootstrap_diff_ci`` (same seed, same replicates); each replicate's ratio uses its own
    resampled baseline mean, so the interval carries the baseline's uncertainty too. Dividing by
    ``|mean(a)|`` keeps the sign of the change when the baseline is negative; a baseline mean of
    exactly 0 has no percent change (ValueError).
    """
    xa, xb = _finite_1d(a, "a"), _finite_1d(b, "b")
    if xa.mean() == 0.0:
        raise ValueError("the baseline mean is 0: a percent change is undefined")
    mean_a, mean_b = _bootstrap_means(xa, xb, n_boot, seed, strata_a, strata_b)
    with np.errstate(divide="ignore", invalid="ignore"):
        replicates = 100.0 * (mean_b - mean_a) / np.abs(mean_a)
    low, high = _percentile_interval(replicates[np.isfinite(replicates)], level)
    return DiffCI(float(100.0 * (xb.mean() - xa.mean()) / abs(xa.mean())), low, high)


def permutation_pvalue(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    n_perm: int = 10000,
    seed: int = 0,
    strata_a: Sequence | np.ndarray | None = None,
    strata_b: Sequence | np.ndarray | None = None,
) -> float:
    """Two-sided Monte Carlo permutation p-value of ``mean(b) - mean(a)``.

    Under the null the model labels are exchangeable (within each stratum when strata are
    given). p = (1 + #{|T*| >= |T|}) / (1 + n_perm): the observed labelling counts as one of the
    permutations, so p is never 0 (Phipson & Smyth 2010). Ties within floating-point round-off of
    |T| count as "at least as extreme".
    """
    xa, xb = _finite_1d(a, "a"), _finite_1d(b, "b")
    if n_perm < 1:
        raise ValueError(f"n_perm must be >= 1, got {n_perm}")
    sa, sb = _strata(strata_a, xa.size, "strata_a"), _strata(strata_b, xb.size, "strata_b")
    labels = _check_strata(sa, sb) if (strata_a is not None or strata_b is not None) else [0]
    observed = xb.mean() - xa.mean()
    rng = np.random.default_rng(seed)
    sum_b = np.zeros(n_perm)  # sum of the values labelled "b" in each permutation
    for s in labels:
        pooled = np.concatenate([xa[sa == s], xb[sb == s]])
        n_b = int(np.sum(sb == s))
        # An independent uniformly random permutation per row.
        order = rng.permuted(np.broadcast_to(np.arange(pooled.size), (n_perm, pooled.size)), axis=1)
        sum_b += pooled[order[:, :n_b]].sum(axis=1)
    total = xa.sum() + xb.sum()
    perm_stat = sum_b / xb.size - (total - sum_b) / xa.size
    scale = max(1.0, float(np.abs(np.concatenate([xa, xb])).max()))
    extreme = np.abs(perm_stat) >= abs(observed) - 1e-9 * scale
    return float((1 + int(extreme.sum())) / (1 + n_perm))


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (family-wise error control over the given tests).

    Sorted ascending, p_(i) is multiplied by (m - i) (i from 0), made monotone non-decreasing and
    capped at 1; NaN entries are left out of the family and stay NaN.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    valid = np.flatnonzero(np.isfinite(p))
    m = valid.size
    if m == 0:
        return out
    order = valid[np.argsort(p[valid], kind="stable")]
    adjusted = np.maximum.accumulate(p[order] * (m - np.arange(m)))
    out[order] = np.minimum(adjusted, 1.0)
    return out
