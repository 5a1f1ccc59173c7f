"""Per-task held-out loss as a function of mixing shares, fitted on proxy runs: how a mixture search ranks mixtures.

RegMix (Liu et al. 2024) regresses each domain's validation loss on the mixture weights of small proxy runs, with
linear regression and LightGBM; Data Mixing Laws (Ye et al. 2024) fit L_i(r) = c_i + k_i exp(sum_j t_ij r_j). Each
model here predicts every task's loss from the shares (rows of X that sum to 1), fitted with a well-kept library
(scikit-learn, LightGBM, scipy). `cross_validate` says how well a model ranks proxy runs it did not see (Spearman's
rho of the target, a weighted mean of the tasks' losses), and `propose` takes the mean of the top-k of many
mixtures sampled around a prior, as RegMix does. This module knows numpy and those libraries, not torch or seqio.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import optimize
from scipy.stats import spearmanr

MODELS = ("linear", "lightgbm", "mixing_law")
Predictor = Callable[[np.ndarray], np.ndarray]
"""Shares (n, K) -> predicted losses (n, T)."""


def fit(model: str, shares: np.ndarray, losses: np.ndarray, seed: int = 0) -> Predictor:
    """A predictor of every task's loss (columns of `losses`) from the shares, fitted on the proxy runs."""
    if model == "linear":
        return _linear(shares, losses)
    if model == "lightgbm":
        return _lightgbm(shares, losses, seed)
    if model == "mixing_law":
        return _mixing_law(shares, losses)
    raise ValueError(f"mixture_search.models: unknown model {model!r}; known: {', '.join(MODELS)}")


def _linear(shares: np.ndarray, losses: np.ndarray) -> Predictor:
    """RegMix's linear regression, with its ridge penalty chosen by leave-one-out (the shares sum to 1, so plain
    least squares with an intercept is singular)."""
    from sklearn.linear_model import RidgeCV

    model = RidgeCV(alphas=np.logspace(-6, 1, 15)).fit(shares, losses)
    return lambda x: np.asarray(model.predict(x)).reshape(len(x), -1)


def _lightgbm(shares: np.ndarray, losses: np.ndarray, seed: int) -> Predictor:
    """RegMix's LightGBM regressor, one per task, sized for a few dozen runs (its defaults need 20 rows per leaf)."""
    import lightgbm

    models = [lightgbm.LGBMRegressor(n_estimators=300, learning_rate=0.05, num_leaves=7, min_child_samples=3,
                                     min_data_in_bin=1, random_state=seed, deterministic=True, n_jobs=1,
                                     verbose=-1).fit(shares, losses[:, t]) for t in range(losses.shape[1])]
    return lambda x: np.stack([m.predict(x) for m in models], axis=1)


def _mixing_law(shares: np.ndarray, losses: np.ndarray) -> Predictor:
    """Data Mixing Laws' L_i = c_i + k_i exp(sum_j t_ij r_j), per task, by least squares (k_i > 0 as exp of a
    parameter; a small penalty on t keeps the fit defined with few runs)."""
    params = [_fit_law(shares, losses[:, t]) for t in range(losses.shape[1])]

    def predict(x: np.ndarray) -> np.ndarray:
        return np.stack([c + np.exp(log_k + x @ t) for c, log_k, t in params], axis=1)
    return predict


def _fit_law(shares: np.ndarray, y: np.ndarray) -> tuple[float, float, np.ndarray]:
    spread = float(np.ptp(y)) or 1.0
    c0 = float(y.min()) - spread
    x0 = np.concatenate([[c0, np.log(float(y.mean()) - c0)], np.zeros(shares.shape[1])])
    penalty = 1e-3

    def residuals(p: np.ndarray) -> np.ndarray:
        fitted = p[0] + np.exp(np.clip(p[1] + shares @ p[2:], -50, 50))
        return np.concatenate([(fitted - y) / spread, penalty * p[2:]])
    p = optimize.least_squares(residuals, x0, method="trf", max_nfev=5000).x
    return float(p[0]), float(p[1]), p[2:]


def target(losses: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The target of each row: the weighted mean of its tasks' losses (weights normalised to sum to 1)."""
    return losses @ (weights / weights.sum())


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rho, or None where it is undefined (a constant side)."""
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def cross_validate(model: str, shares: np.ndarray, losses: np.ndarray, weights: np.ndarray, folds: int = 5,
                   seed: int = 0) -> dict:
    """Each proxy run's losses predicted by the model fitted on the folds without it; how well those predictions
    rank the runs: Spearman's rho on the target and on each task."""
    from sklearn.model_selection import KFold

    predicted = np.zeros_like(losses)
    for train, held_out in KFold(n_splits=min(folds, len(shares)), shuffle=True, random_state=seed).split(shares):
        predicted[held_out] = fit(model, shares[train], losses[train], seed)(shares[held_out])
    return {"spearman": spearman(target(predicted, weights), target(losses, weights)),
            "per_task": [spearman(predicted[:, t], losses[:, t]) for t in range(losses.shape[1])],
            "predicted": predicted}


def dirichlet(prior: np.ndarray, concentration: float, count: int, seed: int, start: int = 0) -> np.ndarray:
    """`count` shares drawn from Dirichlet(concentration x K x prior) (concentration 1 around an equal prior is the
    flat Dirichlet; larger stays nearer the prior). Draw i depends on (seed, i) alone, so a search that asks for
    more runs keeps its first ones."""
    alpha = _alpha(prior, concentration)
    return np.stack([np.random.default_rng([seed, i]).dirichlet(alpha) for i in range(start, start + count)])


def _alpha(prior: np.ndarray, concentration: float) -> np.ndarray:
    """The Dirichlet's parameters: concentration x K x prior shares (proxies and candidates are drawn alike)."""
    return concentration * len(prior) * np.asarray(prior, dtype=float)


def propose(predictor: Predictor, weights: np.ndarray, prior: np.ndarray, concentration: float,
            candidates: int, top_k: int, seed: int) -> np.ndarray:
    """RegMix's proposal: the mean shares of the `top_k` of `candidates` mixtures, drawn as the proxies were,
    with the lowest predicted target."""
    draws = np.random.default_rng([seed, 2**31]).dirichlet(_alpha(prior, concentration), size=candidates)
    scores = np.concatenate([target(predictor(chunk), weights) for chunk in np.array_split(draws, max(
        1, candidates // 10_000))])
    best = np.argsort(scores, kind="stable")[:top_k]
    return draws[best].mean(axis=0)


def best_model(results: dict[str, dict], order: Sequence[str]) -> str:
    """The model whose cross-validated target Spearman is highest (the first in `order` on a tie or where none is
    defined)."""
    return max(order, key=lambda m: (results[m]["spearman"] if results[m]["spearman"] is not None else -2.0,
                                     -order.index(m)))
