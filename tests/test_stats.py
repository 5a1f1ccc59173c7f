"""Intervals, paired tests, seed agreement and the teacher-forced figures, each against a case with a known answer
on the real validation data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import seqio
import tensorflow as tf
import torch

import tasks  # noqa: F401  (registers the tasks)
from mtplatform import catalog, evaluate, length_batches, report, scoring, stats
from mtplatform import model as model_lib


def _validation(task_name: str, n: int | None = None) -> tuple[seqio.Task, list, list]:
    """(task, postprocessed targets, the raw examples) of the first n validation examples."""
    task = seqio.get_mixture_or_task(task_name)
    ds = task.get_dataset(None, split="validation", shuffle=False, use_cached=False)
    examples = list((ds.take(n) if n else ds).as_numpy_iterator())
    targets = [task.postprocess_fn(ex["targets_pretokenized"].decode(), example=ex, is_target=True)
               for ex in examples]
    return task, targets, examples


def test_accuracy_interval_matches_the_binomial_standard_error(data_dir, vocab_file):
    task, targets, _ = _validation("glue_sst2")
    predictions = [1] * len(targets)  # the constant "positive"
    indices = stats.resample_indices(task.name, len(targets))
    reps = stats.replicates(task.metric_fns, targets, predictions, indices)["accuracy"]
    p = np.mean(np.array(targets) == 1)
    standard_error = 100 * math.sqrt(p * (1 - p) / len(targets))  # 1.69 points on SST-2's 872 sentences
    assert reps.std() == pytest.approx(standard_error, rel=0.1)
    low, high = stats.ci95(reps)
    assert low < 100 * p < high and high - low == pytest.approx(2 * 1.96 * standard_error, rel=0.15)
    # Resampling is the same for every arm scored on the same examples (what makes the test paired).
    assert np.array_equal(indices, stats.resample_indices(task.name, len(targets)))


def test_replicates_equal_the_metric_recomputed_on_each_resample(data_dir, vocab_file):
    """Per-example resampling (accuracy, SQuAD's EM/F1) and the vectorized corpus-level metrics (MRPC's F1 with
    invalid predictions, STS-B's correlations, CoLA's Matthews correlation, CoNLL's entity F1) all give the metric
    recomputed on the resampled examples."""
    rng = np.random.default_rng(0)
    for name in ("glue_mrpc", "glue_stsb", "glue_cola", "squad_v1_devsplit", "conll2003_ner"):
        task, targets, _ = _validation(name, 120)
        if name == "squad_v1_devsplit":
            predictions = [t[0] if rng.random() < 0.5 else "the" for t in targets]
        elif name == "glue_stsb":
            predictions = [round(float(t) + rng.normal(0, 1.5), 1) for t in targets]
        elif name == "conll2003_ner":
            predictions = [{"spans": [s for s in t["spans"] if rng.random() < 0.7], "invalid": int(rng.random() < 0.2)}
                           for t in targets]
        else:  # a tenth of them invalid (t5's postprocessor gives -1 for a label it does not know)
            predictions = [-1 if rng.random() < 0.1 else t if rng.random() < 0.7 else 1 - t for t in targets]
        corpus_level = [fn for fn in task.metric_fns if fn in stats._VECTORIZED]
        assert corpus_level or name in ("squad_v1_devsplit",), name
        assert all(stats._agrees(fn, stats._VECTORIZED[fn], targets, predictions) for fn in corpus_level), name
        indices = stats.resample_indices(name, len(targets), samples=20)
        reps = stats.replicates(task.metric_fns, targets, predictions, indices)
        for b in (0, 7, 19):
            direct = {}
            for fn in task.metric_fns:
                direct.update(fn([targets[i] for i in indices[b]], [predictions[i] for i in indices[b]]))
            for key, value in direct.items():
                assert reps[key][b] == pytest.approx(float(value), abs=1e-9), (name, key)


@pytest.mark.parametrize("name", ["glue_cola", "glue_mrpc", "glue_stsb", "conll2003_ner"])
def test_vectorized_replicates_equal_recomputing_on_all_resamples(name, data_dir, vocab_file, monkeypatch):
    """On every one of 300 resamples, a registered vectorized form gives what recomputing the metric on each gives,
    NaN where it is NaN: predictions of a near-constant model (some 5% of resamples constant) and of a noisy one.
    (300, not the 1,000 of an evaluation: recomputing sklearn's metrics on each is most of this test's time.)"""
    task, targets, _ = _validation(name, 100)
    rng = np.random.default_rng(1)
    if name == "glue_stsb":  # rounded to 0.2 as t5's postprocessor does; constant resamples give NaN correlations
        cases = [[2.6 if i % 40 else 3.0 for i in range(100)],
                 [round(float(t) + rng.normal(0, 1.5), 1) for t in targets]]
    elif name == "conll2003_ner":
        cases = [[{"spans": [], "invalid": int(i % 30 == 0)} for i in range(100)],
                 [{"spans": [s for s in t["spans"] if rng.random() < 0.7], "invalid": int(rng.random() < 0.2)}
                  for t in targets]]
    else:
        cases = [[1 if i % 40 else 0 for i in range(100)],
                 [-1 if rng.random() < 0.1 else t if rng.random() < 0.7 else 1 - t for t in targets]]
    indices = stats.resample_indices(name, 100, samples=300)
    for predictions in cases:
        fast = stats.replicates(task.metric_fns, targets, predictions, indices)
        with monkeypatch.context() as m:
            m.setattr(stats, "_VECTORIZED", {})
            slow = stats.replicates(task.metric_fns, targets, predictions, indices)
        assert fast.keys() == slow.keys()
        if name == "glue_stsb" and predictions is cases[0]:  # the NaN of constant resamples is exercised
            assert any(np.isnan(values).any() for values in slow.values())
        for key in fast:
            assert np.array_equal(np.isnan(fast[key]), np.isnan(slow[key])), key
            assert np.allclose(fast[key], slow[key], rtol=0, atol=1e-9, equal_nan=True), key


def test_a_vectorized_form_that_disagrees_with_its_metric_is_not_used(capsys):
    """A registered vectorized form is checked against the metric before use; a wrong one is reported and the
    metric recomputed on each resample instead."""

    def share_of_ones(targets, predictions):
        return {"ones": 100.0 * sum(p == 1 for p in predictions) / len(predictions) + 0.0 * len(set(targets))}

    stats.register_replicates(share_of_ones, lambda targets, predictions, indices: {
        "ones": 50.0 + 0.0 * indices.sum(axis=1)})
    try:
        predictions = [1, 0, 0, 1, 1, 1, 0, 1]
        indices = stats.resample_indices("share_of_ones", len(predictions), samples=5)
        reps = stats.replicates([share_of_ones], [0] * 8, predictions, indices)["ones"]
    finally:
        del stats._VECTORIZED[share_of_ones]
    assert reps == pytest.approx([100.0 * np.mean([predictions[i] == 1 for i in idx]) for idx in indices])
    err = capsys.readouterr().err
    assert "vectorized bootstrap of metric" in err and "share_of_ones" in err and "ones = 50.0" in err


def test_identical_arms_differ_by_nothing_and_a_real_gap_is_significant(data_dir, vocab_file):
    task, targets, _ = _validation("glue_rte")
    indices = stats.resample_indices(task.name, len(targets))
    constant = stats.replicates(task.metric_fns, targets, [0] * len(targets), indices)["accuracy"]  # entailment
    same = stats.replicates(task.metric_fns, targets, [0] * len(targets), indices)["accuracy"]
    assert stats.paired_p_value(constant, same) == 1.0
    flipped = [t if i % 5 else 1 - t for i, t in enumerate(targets)]  # 80% right
    better = stats.replicates(task.metric_fns, targets, flipped, indices)["accuracy"]
    assert stats.paired_p_value(constant, better) < 0.01
    # Over seeds: identical seeds give the example-level interval; the seed level widens it when seeds differ.
    assert np.array_equal(stats.over_seeds([constant, constant]), constant)
    assert np.ptp(stats.over_seeds([constant, better])) > np.ptp(constant)


def test_kendall_tau_between_seeds():
    assert stats.kendall_tau([[1, 2, 3], [10, 20, 30]]) == 1.0
    assert stats.kendall_tau([[1, 2, 3], [3, 2, 1]]) == -1.0
    assert stats.kendall_tau([[1, 2, 3]]) is None


def _constant_label_model(label_ids: list[int], vocab_size: int) -> model_lib.T5:
    """A model whose next-token distribution is the same everywhere and favours the tokens of one label: it prefers
    that label for every input, as a constant predictor does."""
    torch.manual_seed(0)
    model = model_lib.T5(model_lib.T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                            num_decoder_layers=1, num_heads=4))
    logits = torch.zeros(vocab_size)
    logits[label_ids] = 10.0
    model._logits = lambda x: logits.expand(*x.shape[:-1], vocab_size)
    return model


def test_a_constant_predictors_label_accuracy_is_its_accuracy(data_dir, vocab_file):
    """Rank classification on real SST-2 and RTE: a model that always prefers the majority label scores exactly the
    majority-class baseline's accuracy; target NLL is its per-token loss on the gold labels."""
    for name in ("glue_sst2", "glue_rte"):
        task = seqio.get_mixture_or_task(name)
        majority, baseline = evaluate.constant_baseline(name, num_examples=64)
        vocab = task.output_features["targets"].vocabulary
        model = _constant_label_model(vocab.encode(majority) + [1], vocab.vocab_size)
        result = evaluate.evaluate_tasks(model, name, num_examples=64, max_decode_length=4)[name]
        assert catalog.LABELS[name] and result.num_examples == 64
        assert result.metrics["label_accuracy"] == pytest.approx(baseline["accuracy"])
        assert baseline["label_accuracy"] == pytest.approx(baseline["accuracy"])
        assert result.metrics["gold_label_logprob"] < 0 and result.metrics["target_nll"] > 0
        low, high = stats.ci95(result.replicates["label_accuracy"])
        assert low <= baseline["accuracy"] <= high
        assert set(result.replicates) >= {"accuracy", "target_nll", "label_accuracy", "gold_label_logprob"}
        assert report.score(result.metrics) == pytest.approx(result.metrics["accuracy"])  # not in the score


def test_target_nll_is_the_per_token_loss_of_the_targets(data_dir, vocab_file):
    """target_nll equals the training loss's cross-entropy (without z-loss) over the same examples' target tokens."""
    torch.manual_seed(0)
    model = model_lib.T5(model_lib.T5Config(vocab_size=4096, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                            num_decoder_layers=1, num_heads=4)).eval()
    encode, passes = model.encode, []
    model.encode = lambda *a, **k: passes.append(1) or encode(*a, **k)
    result = evaluate.evaluate_tasks(model, "glue_mrpc", num_examples=16, max_decode_length=4,
                                     batch_size=8)["glue_mrpc"]
    assert len(passes) == 2  # two batches, each encoded once for both decoding and scoring
    model.encode = encode
    task = seqio.get_mixture_or_task("glue_mrpc")
    ds = task.get_dataset(None, split="validation", shuffle=False, use_cached=False).take(16)
    converted = seqio.EncDecFeatureConverter(pack=False)(ds, {"inputs": 512, "targets": 16})
    total, tokens = 0.0, 0.0
    with torch.no_grad():
        for batch in converted.batch(16).as_numpy_iterator():
            loss, weight = model.loss({k: torch.tensor(v) for k, v in batch.items()})
            total, tokens = total + float(loss), tokens + float(weight)
    assert result.metrics["target_nll"] == pytest.approx(total / tokens, rel=1e-4)
    # MRPC's targets are its labels: their pass gives the target NLL, with or without the label set at hand.
    vocab = task.output_features["targets"].vocabulary
    label_ids = [vocab.encode(label) + [1] for label in catalog.LABELS["glue_mrpc"]]
    indexed = tf.data.Dataset.zip((tf.data.Dataset.range(16), converted))
    with_labels = scoring.score(model, indexed, 8, label_ids=label_ids, gold=[0] * 16)
    alone = scoring.score(model, indexed, 8)
    assert np.allclose(with_labels.nll_sum, alone.nll_sum, rtol=1e-5) and np.array_equal(with_labels.tokens,
                                                                                          alone.tokens)
    targets = torch.tensor([[5, 1, 0, 0], [7, 1, 0, 0]])
    assert scoring._label_of(targets, torch.tensor([[7, 1], [5, 1]])).tolist() == [1, 0]
    assert scoring._label_of(targets, torch.tensor([[7, 1, 0], [6, 1, 0]])) is None  # 5 is no label: its own pass
    # Without decoding (a mixture search's proxies): the same teacher-forced figures and their replicates, and no
    # decoded metric (the same batches: batches by length are trimmed to their longest row, so others round
    # otherwise).
    undecoded = evaluate.evaluate_tasks(model, "glue_mrpc", num_examples=16, decode=False, batch_size=8)["glue_mrpc"]
    assert undecoded.metrics == {k: v for k, v in result.metrics.items()
                                 if k in ("target_nll", "label_accuracy", "gold_label_logprob")}
    assert set(undecoded.replicates) == {"target_nll", "label_accuracy", "gold_label_logprob"}
    assert np.array_equal(undecoded.replicates["target_nll"], result.replicates["target_nll"])


def test_evaluations_reusing_seqio_evaluators_score_as_fresh_ones(data_dir, vocab_file, monkeypatch):
    """Within `reusing_evaluators` (an experiment's stages, a training run) each task's seqio Evaluator is built
    once and reused for every later checkpoint: the same metrics and replicates as a fresh Evaluator each time,
    for two different models, decoded and teacher-forced alone; and each Evaluator's split is read from
    TensorFlow once (`length_batches._materialized`), not once per model and way of evaluating."""
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(model_lib.T5(model_lib.T5Config(vocab_size=4096, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                      num_decoder_layers=1, num_heads=4)).eval())
    settings = {"num_examples": 24, "max_decode_length": 4, "batch_size": 8}
    fresh = [evaluate.evaluate_tasks(m, "glue_cola", **settings)["glue_cola"] for m in models]
    fresh_nll = evaluate.evaluate_tasks(models[1], "glue_cola", decode=False, **settings)["glue_cola"]
    built = []
    evaluator = seqio.Evaluator
    monkeypatch.setattr(seqio, "Evaluator", lambda *a, **k: built.append(1) or evaluator(*a, **k))
    reads, read = [], length_batches._read
    monkeypatch.setattr(length_batches, "_read", lambda *a: reads.append(1) or read(*a))
    with evaluate.reusing_evaluators():
        reused = [evaluate.evaluate_tasks(m, "glue_cola", **settings)["glue_cola"] for m in models]
        reused_nll = evaluate.evaluate_tasks(models[1], "glue_cola", decode=False, **settings)["glue_cola"]
        evaluate.evaluate_tasks(models[0], "glue_cola", **(settings | {"num_examples": 16}))
    assert len(built) == 2  # one for 24 examples, one for 16: other settings are another evaluator
    assert len(reads) == 2  # each evaluator's split, for both models, decoded and scored alone
    assert fresh[0].metrics != fresh[1].metrics  # the two models differ, so a stale reuse would show
    for a, b in zip(fresh + [fresh_nll], reused + [reused_nll], strict=True):
        assert a.metrics == b.metrics and a.num_examples == b.num_examples == 24
        assert a.replicates.keys() == b.replicates.keys()
        assert all(np.array_equal(a.replicates[k], b.replicates[k], equal_nan=True) for k in a.replicates)
    assert evaluate._kept_evaluators is None  # nothing is kept outside the scope


def test_evaluation_batched_by_length_scores_as_seqio_order_on_fewer_columns(data_dir, vocab_file):
    """Batches sorted by input length and trimmed to their longest row (`length_batches`) give the same
    predictions and figures (to float rounding) as seqio's order and padding, on real SQuAD contexts (inputs of
    very different lengths), decoded and teacher-forced alone; the encoder sees each batch's own longest row."""
    torch.manual_seed(0)
    model = model_lib.T5(model_lib.T5Config(vocab_size=4096, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                            num_decoder_layers=1, num_heads=4)).eval()
    encode, widths = model.encode, []
    model.encode = lambda tokens, *a, **k: widths.append(tokens.shape[1]) or encode(tokens, *a, **k)
    settings = {"num_examples": 40, "max_decode_length": 6, "batch_size": 8}
    results = {}
    for by_length in (False, True):
        widths.clear()
        decoded = evaluate.evaluate_tasks(model, "squad_v1_devsplit", by_length=by_length, **settings)
        alone = evaluate.evaluate_tasks(model, "squad_v1_devsplit", by_length=by_length, decode=False, **settings)
        results[by_length] = (decoded["squad_v1_devsplit"], alone["squad_v1_devsplit"], list(widths))
    (seqio_order, seqio_alone, padded), (by_length, by_length_alone, trimmed) = results[False], results[True]
    ds = evaluate._evaluator(seqio.get_mixture_or_task("squad_v1_devsplit"), "validation", None, 40)[0]
    inputs = [ex["encoder_input_tokens"] for _, ex in ds.cached_model_datasets["squad_v1_devsplit"]
              .as_numpy_iterator()]
    longest_first = sorted((int(np.count_nonzero(row)) for row in inputs), reverse=True)
    assert padded == [len(inputs[0])] * 5 * 2  # seqio pads every batch to the split's longest, decoded and alone
    assert trimmed == [longest_first[k] for k in range(0, 40, 8)] * 2
    assert sum(trimmed) < 0.8 * sum(padded)
    for a, b in ((seqio_order, by_length), (seqio_alone, by_length_alone)):
        assert a.metrics.keys() == b.metrics.keys() and a.num_examples == b.num_examples == 40
        for name, value in a.metrics.items():
            assert b.metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
            assert np.allclose(a.replicates[name], b.replicates[name], rtol=1e-5, atol=1e-6, equal_nan=True), name
