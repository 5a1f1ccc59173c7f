"""`mtp mixture search` end to end on real data (tiny model, few runs of few steps): proxy runs measured on held-out
loss, a fit and a proposal that `mtp train` and experiments take, a resumed search that reuses its runs, and the
validation of the proposal against fixed strategies with paired tests."""

from __future__ import annotations

import json
import math

import gin
import pytest
import seqio
from test_experiment import _in_process

import tasks  # noqa: F401
from mtplatform import cli, mixing

MIXTURE = "search_test_mix"
DECLARE = f"--gin.mixtures.declared={{'{MIXTURE}': {{'tasks': ['glue_rte', 'glue_stsb', 'span_corruption']}}}}"
TINY = ("--gin_file=gin/models/tiny.gin", "--gin.BATCH_SIZE=4",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}", "--gin.train.log_every=2",
        "--gin.train.progress=False")


def _search(root, *overrides: str) -> list[str]:
    return ["mixture", "search", MIXTURE, "--gin_file=gin/experiments/mixture_search.gin", *TINY, DECLARE,
            f"--gin.EXPERIMENT_DIR='{root}'", "--gin.mixture_search.num_runs=8", "--gin.mixture_search.steps=4",
            "--gin.mixture_search.eval_num_examples=16", "--gin.mixture_search.candidates=2000",
            "--gin.mixture_search.top_k=20", *overrides]


@pytest.mark.slow
def test_search_proposes_rates_that_train_and_validate(tmp_path, vocab_file, capfd):
    root = tmp_path / "search"
    code, err = _in_process(capfd, *_search(root))
    assert code == 0, err[-3000:]
    results = json.loads((root / "results.json").read_text())
    assert results["evaluated"] == ["glue_rte", "glue_stsb"]  # span corruption has no held-out metric
    assert results["target_weights"] == {"glue_rte": 1.0, "glue_stsb": 1.0}
    assert len(results["proxy"]) == 8
    for i, proxy in enumerate(results["proxy"]):
        assert sum(proxy["rates"].values()) == pytest.approx(1.0)
        assert all(0 < v < 20 for v in proxy["measured"].values())
        assert proxy["measured_target"] == pytest.approx(sum(proxy["measured"].values()) / 2)
        # Each measurement is a teacher-forced evaluation that ran (no decoding, so no decoded metric).
        written = json.loads((root / f"proxy_{i:03d}" / "seed_0" / "eval" / "4_glue_rte" / "metrics.json")
                             .read_text())["metrics"]["glue_rte"]
        assert written["target_nll"] == proxy["measured"]["glue_rte"] and "accuracy" not in written
        rates = json.loads((root / f"proxy_{i:03d}" / "seed_0" / "mixture.json").read_text())["tasks"]
        assert {t: v["share"] for t, v in rates.items()} == pytest.approx(proxy["rates"])
    assert set(results["fits"]) == {"linear", "lightgbm", "mixing_law"}
    assert results["model"] in results["fits"] and results["spearman"] == results["fits"][results["model"]]["spearman"]
    proposed = results["proposal"]["rates"]
    assert sum(proposed.values()) == pytest.approx(1.0)
    assert set(results["strategies"]) >= {"equal", "temperature T=2", "prior (the mixture's configured rates)"}
    assert results["strategies"]["equal"]["rates"] == pytest.approx(dict.fromkeys(proposed, 1 / 3))
    assert "## Fit (cross-validated" in (root / "results.md").read_text()
    for plot in ("predicted_vs_measured.png", "rates.png"):
        assert (root / plot).stat().st_size > 5000

    # The proposal is a gin file `mtp train` takes: its declared mixture trains on exactly the proposed shares.
    gin.clear_config()
    try:
        cli.parse_gin(["gin/runs/pretrain.gin", str(root / "proposal.gin")], [], [])
        shares = mixing.resolve(seqio.get_mixture_or_task(f"{MIXTURE}_searched")).shares
        assert shares == pytest.approx(proposed, abs=1e-6)
    finally:
        gin.clear_config()

    # Resumed: every proxy is reused and the fit is the same; asking for one more run trains only that one.
    code, err = _in_process(capfd, *_search(root))
    assert code == 0 and err.count("already finished; skipped") == 8
    assert json.loads((root / "results.json").read_text()) == results
    code, err = _in_process(capfd, *_search(root, "--gin.mixture_search.num_runs=9"))
    assert code == 0 and err.count("already finished; skipped") == 8 and "stage proxy_008 (seed 0)" in err
    # Proxies drawn around another prior are not the runs of this directory.
    code, err = _in_process(capfd, *_search(root, "--gin.mixture_search.concentration=3.0"))
    assert code == 2 and "drawn with another concentration" in err

    # Validation: the proposal as an arm of the validation experiment beside fixed strategies, then compared.
    exp = tmp_path / "validation"
    code, err = _in_process(
        capfd, "experiment", "--gin_file=gin/experiments/mixture_search_validation.gin", *TINY,
        f"--gin_file={root / 'proposal.gin'}", DECLARE, f"--gin.EXPERIMENT_DIR='{exp}'", "--gin.BUDGET=0.00001",
        "--gin.mixing_strategies.tasks=['glue_rte', 'glue_stsb']", "--gin.mixing_strategies.caps=[]",
        "--gin.mixing_strategies.temperatures=[2.0]", "--gin.experiment.eval_num_examples=16",
        "--gin.experiment.evals_per_stage=1", "--gin.evaluate_checkpoint.max_decode_length=4",
        "--gin.mixing_strategies.extra={'searched': {'strategy': 'explicit', 'weights': %SEARCHED_WEIGHTS}}")
    assert code == 0, err[-3000:]
    code, err = _in_process(capfd, *_search(root, "--gin.mixture_search.num_runs=9",
                                            f"--gin.mixture_search.validation_dir='{exp}'"))
    assert code == 0, err[-3000:]
    validated = json.loads((root / "results.json").read_text())
    rows = validated["validation"]
    assert [r["arm"] for r in rows] == ["equal", "temperature T=2", "UniMax N=1", "searched"]
    searched = rows[-1]  # it trained on the proposal of the 9-run search, which proposal.gin held then
    assert searched["rates"] == pytest.approx(validated["proposal"]["rates"], abs=1e-6)
    assert "p_value" not in searched
    for row in rows[:-1]:
        assert 0.0 <= row["p_value"] <= 1.0 and math.isfinite(row["predicted_target"])
        low, high = row["minus_searched_ci95"]
        assert low <= high and row["minus_searched"] == pytest.approx(
            row["measured_target"] - searched["measured_target"])
    assert "## Validation: trained at the experiment's budget" in (root / "results.md").read_text()
