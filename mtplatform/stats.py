"""Uncertainty of evaluation figures: bootstrap replicates over examples, intervals over examples and seeds, paired
bootstrap tests between arms, and how well seeds agree on a ranking.

One evaluation's replicates are computed once, where its predictions are in memory (`replicates`), on resampled
example indices that depend only on the task and its number of examples (`resample_indices`): every arm and seed
scored on the same examples is resampled identically, so two arms' replicates pair up, as a paired bootstrap test
needs (Koehn 2004; Berg-Kirkpatrick et al. 2012). The report nests a resampling of seeds above them (`over_seeds`).
scipy's `bootstrap` resamples one statistic of its own data, with no shared indices across calls and no seed level,
so the loop is ours; scipy gives Kendall's tau.
A metric computed over the whole corpus (F1, Matthews correlation, Pearson and Spearman correlations) is recomputed
on each resample, unless its task registered an equivalent that computes all resamples at once in numpy
(`register_replicates`, with the helpers below): on MRPC's 100 examples, 1,000 calls of t5's F1 took 1.4 s, and an
experiment evaluates every task of every stage.
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np

SAMPLES = 1000
"""Bootstrap replicates per figure (the usual 1,000): a p-value resolves to 0.002."""

MetricFn = Callable[[list, list], Mapping[str, float]]
VectorizedFn = Callable[[Sequence, Sequence, np.ndarray], Mapping[str, np.ndarray]]
"""(targets, predictions, (samples, n) indices) -> {metric: (samples,) values on each resample}."""

_VECTORIZED: dict[MetricFn, VectorizedFn] = {}


def resample_indices(key: str, n: int, samples: int = SAMPLES) -> np.ndarray:
    """(samples, n) example indices drawn with replacement, the same for every call with the same key and n."""
    rng = np.random.default_rng(zlib.crc32(f"{key}:{n}".encode()))
    return rng.integers(0, n, size=(samples, n))


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """Undefined metrics of tiny or degenerate resamples (F1, correlations) warn, then give 0 or NaN: no warning."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        yield


def _values(fn: MetricFn, targets: Sequence, predictions: Sequence) -> dict[str, float]:
    with _silenced():
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


def register_replicates(fn: MetricFn, vectorized: VectorizedFn) -> None:
    """Compute `fn`'s bootstrap replicates with `vectorized`, all resamples at once. Before each use it is checked
    against `fn` itself on all the examples and on the first half; where they disagree, `replicates` says so and
    recomputes `fn` on each resample."""
    _VECTORIZED[fn] = vectorized


def replicates(metric_fns: Sequence[MetricFn], targets: Sequence, predictions: Sequence,
               indices: np.ndarray) -> dict[str, np.ndarray]:
    """{metric: (samples,) values} of each official metric on each resample of (targets, predictions).
    Metrics that are means over examples are resampled from per-example values; those with a registered vectorized
    form use it (`register_replicates`); the others are recomputed."""
    out: dict[str, np.ndarray] = {}
    for fn in metric_fns:
        vectorized = _VECTORIZED.get(fn)
        if vectorized is not None and _agrees(fn, vectorized, targets, predictions):
            out.update({key: np.asarray(values, dtype=np.float64)
                        for key, values in _quiet(vectorized, targets, predictions, indices).items()})
            continue
        per_example = _per_example(fn, targets, predictions) if len(targets) > 1 else None
        if per_example is not None:
            out.update({key: values[indices].mean(axis=1) for key, values in per_example.items()})
            continue
        rows = [_values(fn, [targets[i] for i in idx], [predictions[i] for i in idx]) for idx in indices]
        out.update({key: np.array([row[key] for row in rows]) for key in rows[0]})
    return out


def _quiet(vectorized: VectorizedFn, targets: Sequence, predictions: Sequence,
           indices: np.ndarray) -> Mapping[str, np.ndarray]:
    with _silenced():
        return vectorized(targets, predictions, indices)


def _agrees(fn: MetricFn, vectorized: VectorizedFn, targets: Sequence, predictions: Sequence) -> bool:
    """Whether `vectorized` gives `fn`'s values on all examples and on the first half (NaN where `fn` gives NaN)."""
    n, checked = len(targets), False
    for subset in sorted({n, max(1, n // 2)}):
        try:
            official = _values(fn, targets[:subset], predictions[:subset])
        except ValueError:  # undefined on so few examples (a correlation of one): nothing to check against
            continue
        checked = True
        got = _quiet(vectorized, targets[:subset], predictions[:subset], np.arange(subset)[None])
        for key, value in official.items():
            mine = float(got[key][0]) if key in got else math.nan
            if not (math.isclose(mine, value, rel_tol=1e-9, abs_tol=1e-9) or (math.isnan(mine) and math.isnan(value))):
                name = getattr(fn, "__qualname__", repr(fn))
                print(f"mtp: the vectorized bootstrap of metric {name} gives {key} = {mine!r} where the metric gives "
                      f"{value!r} on the first {subset} examples: recomputing it on each resample instead",
                      file=sys.stderr)
                return False
    return checked


# --- vectorized forms of common corpus-level metrics: rows are resamples -------------------------------------------


def resampled_sums(per_example: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """(samples, m) sums over each resample of (n, m) per-example counts: what a metric of summed counts (a
    confusion matrix, entity-level hits) needs."""
    per_example = np.asarray(per_example, dtype=np.float64)
    return np.stack([column[indices].sum(axis=1) for column in per_example.T], axis=1)


def confusion_matrices(targets: Sequence, predictions: Sequence, indices: np.ndarray) -> np.ndarray:
    """(samples, k, k) confusion matrices (rows targets, columns predictions) of each resample, over the k values
    that targets and predictions take, sorted."""
    n = len(targets)
    _, codes = np.unique(np.concatenate([np.asarray(targets), np.asarray(predictions)]), return_inverse=True)
    k = int(codes.max()) + 1
    cells = np.eye(k * k)[codes[:n] * k + codes[n:]]
    return resampled_sums(cells, indices).reshape(len(indices), k, k)


def matthews_corrcoef(confusion: np.ndarray) -> np.ndarray:
    """scikit-learn's (multi-class) Matthews correlation of each of (samples, k, k) confusion matrices: 0 where it
    is undefined, as there."""
    t_sum, p_sum = confusion.sum(axis=2), confusion.sum(axis=1)
    correct, total = np.trace(confusion, axis1=1, axis2=2), p_sum.sum(axis=1)
    cov_tp = correct * total - (t_sum * p_sum).sum(axis=1)
    cov_pp_tt = (total**2 - (p_sum**2).sum(axis=1)) * (total**2 - (t_sum**2).sum(axis=1))
    return divide_or_zero(cov_tp, np.sqrt(cov_pp_tt))


def f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """F1 from true positives, false positives and false negatives: 0 where it is undefined (scikit-learn's
    `zero_division` default)."""
    return divide_or_zero(2 * tp, 2 * tp + fp + fn)


def divide_or_zero(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator elementwise, 0 where the denominator is 0 (an undefined precision, recall, F1 or
    correlation, as scikit-learn's `zero_division` default gives)."""
    numerator, denominator = np.broadcast_arrays(np.asarray(numerator, dtype=np.float64),
                                                 np.asarray(denominator, dtype=np.float64))
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator != 0)


def pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson's r of each row of (samples, n) x and y, as scipy's `pearsonr` computes it: NaN where either row is
    constant (tested by equality, as there: the mean of a constant row of 2.6s is not exactly 2.6, and the
    deviations' rounding would give an r of about 1e-14)."""
    xm = x - x.mean(axis=1, keepdims=True)
    ym = y - y.mean(axis=1, keepdims=True)
    r = np.clip((xm * ym).sum(axis=1) / (np.linalg.norm(xm, axis=1) * np.linalg.norm(ym, axis=1)), -1.0, 1.0)
    constant = (x == x[:, :1]).all(axis=1) | (y == y[:, :1]).all(axis=1)
    return np.where(constant, np.nan, r)


def spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row: Pearson's r of the average ranks (scipy's `spearmanr`)."""
    from scipy.stats import rankdata

    return pearson(rankdata(x, axis=1), rankdata(y, axis=1))


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
