"""Uncertainty of evaluation figures: bootstrap replicates over examples, intervals over examples and seeds, paired
bootstrap tests between arms, and how well seeds agree on a ranking.

One evaluation's replicates are computed once, where its predictions are in memory (`replicates`), on resampled
example indices that depend only on the task and its number of examples (`resample_indices`): every arm and seed
scored on the same examples is resampled identically, so two arms' replicates pair up, as a paired bootstrap test
needs (Koehn 2004; Berg-Kirkpatrick et al. 2012). The report nests a resampling of seeds above them (`over_seeds`).
scipy's `bootstrap` resamples one statistic of its own data, with no shared indices across calls and no seed level,
so the loop is ours; scipy gives Kendall's tau.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np

SAMPLES = 1000
"""Bootstrap replicates per figure (the usual 1,000): a p-value resolves to 0.002."""

MetricFn = Callable[[list, list], Mapping[str, float]]


def resample_indices(key: str, n: int, samples: int = SAMPLES) -> np.ndarray:
    """(samples, n) example indices drawn with replacement, the same for every call with the same key and n."""
    rng = np.random.default_rng(zlib.crc32(f"{key}:{n}".encode()))
    return rng.integers(0, n, size=(samples, n))


def _values(fn: MetricFn, targets: Sequence, predictions: Sequence) -> dict[str, float]:
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # undefined metrics of tiny resamples (F1, correlations) warn, then give 0/NaN
        return {k: float(getattr(v, "value", v)) for k, v in fn(list(targets), list(predictions)).items()}


def _per_example(fn: MetricFn, targets: Sequence, predictions: Sequence) -> dict[str, np.ndarray] | None:
    """Each example's own value of every metric of `fn` when the metric is their mean (accuracy, SQuAD's EM and F1),
    checked on all examples and on the first half; else None (F1 over a corpus, correlations)."""
    n = len(targets)
    try:
        singles = [_values(fn, [t], [p]) for t, p in zip(targets, predictions, strict=True)]
    except ValueError:  # undefined on one example (scipy's correlations): not a mean over examples
        return None
    for subset in (n, max(1, n // 2)):
        whole = _values(fn, targets[:subset], predictions[:subset])
        for key, value in whole.items():
            mean = float(np.mean([s.get(key, math.nan) for s in singles[:subset]]))
            if not math.isclose(mean, value, rel_tol=1e-9, abs_tol=1e-9):
                return None
    return {key: np.array([s[key] for s in singles]) for key in singles[0]}


def replicates(metric_fns: Sequence[MetricFn], targets: Sequence, predictions: Sequence,
               indices: np.ndarray) -> dict[str, np.ndarray]:
    """{metric: (samples,) values} of each official metric on each resample of (targets, predictions).
    Metrics that are means over examples are resampled from per-example values; the others are recomputed."""
    out: dict[str, np.ndarray] = {}
    for fn in metric_fns:
        per_example = _per_example(fn, targets, predictions) if len(targets) > 1 else None
        if per_example is not None:
            out.update({key: values[indices].mean(axis=1) for key, values in per_example.items()})
            continue
        rows = [_values(fn, [targets[i] for i in idx], [predictions[i] for i in idx]) for idx in indices]
        out.update({key: np.array([row[key] for row in rows]) for key in rows[0]})
    return out


def ratio_replicates(numerator: np.ndarray, denominator: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """sum(numerator) / sum(denominator) on each resample (a per-token mean over resampled examples)."""
    return numerator[indices].sum(axis=1) / np.maximum(1.0, denominator[indices].sum(axis=1))


def mean_replicates(values: np.ndarray, indices: np.ndarray) -> np.ndarray:
    return values[indices].mean(axis=1)


def over_seeds(per_seed: Sequence[np.ndarray], samples: int = SAMPLES) -> np.ndarray:
    """Replicates of the mean over seeds: each replicate draws the seeds with replacement (the same draws for every
    arm with as many seeds, so arms stay paired) and averages their example-level replicates of the same index."""
    stacked = np.stack(per_seed)  # (seeds, samples)
    if len(per_seed) == 1:
        return stacked[0]
    draws = np.random.default_rng(len(per_seed)).integers(0, len(per_seed), size=(samples, len(per_seed)))
    return stacked[draws, np.arange(samples)[:, None]].mean(axis=1)


def ci95(values: np.ndarray) -> list[float] | None:
    """The 2.5th and 97.5th percentiles (the percentile bootstrap interval); None when no replicate is defined."""
    finite = values[np.isfinite(values)]
    if not len(finite):
        return None
    low, high = np.percentile(finite, [2.5, 97.5])
    return [float(low), float(high)]


def paired_p_value(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided paired bootstrap p-value for 'a and b differ': twice the smaller share of replicates on either
    side of zero (zeros count on both sides, so identical arms get 1)."""
    diff = a - b
    diff = diff[np.isfinite(diff)]
    if not len(diff):
        return math.nan
    return float(min(1.0, 2 * min(np.mean(diff <= 0), np.mean(diff >= 0))))


def kendall_tau(by_seed: Sequence[Sequence[float]]) -> float | None:
    """Mean Kendall tau between every two seeds' values over the same arms (1: the seeds rank the arms alike);
    None with fewer than two seeds or arms, NaN where a seed cannot rank them (all equal)."""
    from itertools import combinations

    from scipy.stats import kendalltau

    if len(by_seed) < 2 or len(by_seed[0]) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        taus = [kendalltau(a, b).statistic for a, b in combinations(by_seed, 2)]
    return float(np.mean(taus))
