"""The mixture search's regression: fitted on runs of a known loss function, it ranks held-out runs and proposes
rates near that function's optimum (`mtplatform.regression`)."""

from __future__ import annotations

import numpy as np
import pytest

from mtplatform import regression

# A known mixing law over 4 tasks' shares (Ye et al.'s form): each task's loss falls with its own share and moves
# a little with the others'; the optimum of their mean is inside the simplex, not at a corner.
T = np.array([[-6.0, 1.0, 0.0, 0.5], [0.5, -4.0, 1.0, 0.0], [0.0, 0.5, -3.0, -1.0]])
C = np.array([1.0, 2.0, 0.5])
K = np.array([2.0, 1.0, 1.5])
WEIGHTS = np.ones(3)
PRIOR = np.full(4, 0.25)


def true_losses(shares: np.ndarray) -> np.ndarray:
    return C + K * np.exp(shares @ T.T)


@pytest.fixture(scope="module")
def proxies() -> tuple[np.ndarray, np.ndarray]:
    shares = regression.dirichlet(PRIOR, 1.0, 40, seed=0)
    noise = np.random.default_rng(1).normal(0.0, 0.01, size=(40, 3))  # seed-to-seed noise of a real run
    return shares, true_losses(shares) + noise


@pytest.fixture(scope="module")
def optimum() -> tuple[np.ndarray, float]:
    dense = regression.dirichlet(PRIOR, 1.0, 200_000, seed=7)
    values = regression.target(true_losses(dense), WEIGHTS)
    return dense[values.argmin()], float(values.min())


def test_the_mixing_law_ranks_held_out_runs_and_recovers_the_optimum(proxies, optimum):
    shares, losses = proxies
    cv = regression.cross_validate("mixing_law", shares, losses, WEIGHTS, folds=5, seed=0)
    assert cv["spearman"] > 0.95 and all(rho > 0.9 for rho in cv["per_task"])
    predictor = regression.fit("mixing_law", shares, losses)
    proposal = regression.propose(predictor, WEIGHTS, PRIOR, 1.0, candidates=50_000, top_k=100, seed=0)
    assert proposal.sum() == pytest.approx(1.0)
    best_shares, best = optimum
    prior_value = float(regression.target(true_losses(PRIOR[None]), WEIGHTS)[0])
    found = float(regression.target(true_losses(proposal[None]), WEIGHTS)[0])
    # The proposal closes nearly all of the gap between the prior and the optimum, at nearly the optimal shares.
    assert found - best < 0.05 * (prior_value - best)
    assert np.abs(proposal - best_shares).max() < 0.1


@pytest.mark.parametrize("model", regression.MODELS)
def test_every_model_ranks_held_out_runs_and_beats_the_prior(model, proxies):
    shares, losses = proxies
    cv = regression.cross_validate(model, shares, losses, WEIGHTS, folds=5, seed=0)
    assert cv["predicted"].shape == losses.shape
    assert cv["spearman"] > 0.6
    proposal = regression.propose(regression.fit(model, shares, losses), WEIGHTS, PRIOR, 1.0, 20_000, 50, 0)
    prior_value = regression.target(true_losses(PRIOR[None]), WEIGHTS)[0]
    if model != "linear":  # a linear fit puts its optimum at a corner of the simplex; the law here is convex
        assert regression.target(true_losses(proposal[None]), WEIGHTS)[0] < prior_value


def test_the_best_model_is_chosen_by_cross_validated_spearman(proxies):
    shares, losses = proxies
    fits = {m: regression.cross_validate(m, shares, losses, WEIGHTS) for m in regression.MODELS}
    chosen = regression.best_model(fits, list(regression.MODELS))
    assert fits[chosen]["spearman"] == max(f["spearman"] for f in fits.values())
    assert regression.best_model({"linear": {"spearman": None}, "lightgbm": {"spearman": None}},
                                 ["linear", "lightgbm"]) == "linear"


def test_draws_are_stable_when_a_search_asks_for_more_runs():
    few = regression.dirichlet(PRIOR, 2.0, 5, seed=3)
    more = regression.dirichlet(PRIOR, 2.0, 12, seed=3)
    assert np.array_equal(few, more[:5])
    assert np.allclose(more.sum(axis=1), 1.0) and (more >= 0).all()
    # A larger concentration stays nearer the prior.
    near = regression.dirichlet(PRIOR, 50.0, 200, seed=3)
    far = regression.dirichlet(PRIOR, 0.5, 200, seed=3)
    assert np.abs(near - PRIOR).mean() < 0.5 * np.abs(far - PRIOR).mean()


def test_an_unknown_model_is_named():
    with pytest.raises(ValueError, match="unknown model 'cubic'"):
        regression.fit("cubic", np.eye(3), np.eye(3))
