"""Task metrics against the reference implementations, on real gold labels with known corruption."""

from __future__ import annotations

import collections
import re
import string

import numpy as np
import pytest
import scipy.stats
import seqio
import sklearn.metrics
from seqeval.metrics import f1_score, precision_score, recall_score

import tasks  # noqa: F401
from tasks.conll import format_entities, parse_entities, tags_to_spans


def _score(task_name: str, targets_text: list[str], predictions_text: list[str], examples: list[dict]) -> dict:
    """Run a task's own postprocessor and metric functions the way seqio's Evaluator does."""
    task = seqio.get_mixture_or_task(task_name)
    targets = [task.postprocess_fn(t, example=ex, is_target=True) for t, ex in zip(targets_text, examples, strict=True)]
    preds = [task.postprocess_fn(p, example=ex, is_target=False) for p, ex in zip(predictions_text, examples,
                                                                                  strict=True)]
    out = {}
    for fn in task.metric_fns:
        out.update(fn(targets, preds))
    return out


def _glue_rows(name: str) -> list[dict]:
    return seqio.get_mixture_or_task(name).source.read_rows("validation")


def _flip(labels: list[int], fraction: float, n_classes: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    out = list(labels)
    for i in rng.choice(len(out), int(fraction * len(out)), replace=False):
        out[i] = (out[i] + 1) % n_classes
    return out


@pytest.mark.parametrize("name,n_classes", [("glue_cola", 2), ("glue_mrpc", 2), ("glue_rte", 2), ("glue_sst2", 2),
                                            ("glue_qnli", 2), ("glue_wnli", 2)])
def test_glue_classification_metrics(name, n_classes, data_dir):
    from tasks.glue import _CONFIGS, SPECS

    classes = _CONFIGS[SPECS[name.removeprefix("glue_")].config].label_classes
    rows = _glue_rows(name)
    gold = [r["label"] for r in rows]
    pred = _flip(gold, 0.2, n_classes)
    pred_text = [classes[p] for p in pred]
    pred_text[0] = "not a label"  # invalid output: counts as wrong, as t5 does
    pred[0] = -1
    got = _score(name, [classes[g] for g in gold], pred_text, rows)
    accuracy = 100 * sklearn.metrics.accuracy_score(gold, pred)
    if name == "glue_cola":
        assert got == {"matthews_corrcoef": pytest.approx(100 * sklearn.metrics.matthews_corrcoef(gold, pred))}
    elif name == "glue_mrpc":
        # t5's F1 treats an invalid prediction as the wrong class.
        fixed = [p if p != -1 else 1 - g for p, g in zip(pred, gold, strict=True)]
        assert got == {"f1": pytest.approx(100 * sklearn.metrics.f1_score(gold, fixed)),
                       "accuracy": pytest.approx(accuracy)}
    else:
        assert got == {"accuracy": pytest.approx(accuracy)}


def test_stsb_pearson_spearman(data_dir):
    rows = _glue_rows("glue_stsb")
    gold = [r["label"] for r in rows]
    rng = np.random.default_rng(1)
    pred = np.clip(np.round((np.array(gold) + rng.normal(0, 0.8, len(gold))) * 5) / 5, 0, 5)
    target_text = [f"{round(g * 5) / 5:.1f}" for g in gold]
    got = _score("glue_stsb", target_text, [f"{p:.1f}" for p in pred], rows)
    rounded = [float(t) for t in target_text]
    assert got["pearson_corrcoef"] == pytest.approx(100 * scipy.stats.pearsonr(rounded, pred)[0])
    assert got["spearman_corrcoef"] == pytest.approx(100 * scipy.stats.spearmanr(rounded, pred)[0])


# The official SQuAD v1.1 evaluation script's functions (evaluate-v1.1.py), verbatim in logic.
def _official_normalize(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def _official_f1(prediction, ground_truth):
    prediction_tokens = _official_normalize(prediction).split()
    ground_truth_tokens = _official_normalize(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def _official_em(prediction, ground_truth):
    return _official_normalize(prediction) == _official_normalize(ground_truth)


def _official_evaluate(golds, predictions):
    f1 = em = 0.0
    for gts, p in zip(golds, predictions, strict=True):
        em += max(_official_em(p, g) for g in gts)
        f1 += max(_official_f1(p, g) for g in gts)
    return {"em": 100.0 * em / len(golds), "f1": 100.0 * f1 / len(golds)}


def test_squad_em_f1_equal_official_script(data_dir):
    rows = seqio.get_mixture_or_task("squad_v1").source.read_rows("validation")
    rng = np.random.default_rng(2)
    preds = []
    for r in rows:
        answer = r["answers"][-1]  # the best match may be any gold answer, not the first
        draw = rng.random()
        if draw < 0.2:
            answer = "The " + answer.upper() + "."  # normalization makes it an exact match
        elif draw < 0.4:
            answer = " ".join(answer.split()[:-1]) or "nothing"  # partial overlap
        elif draw < 0.5:
            answer = r["context"][:30]  # mostly wrong
        preds.append(answer)
    got = _score("squad_v1", [r["answers"][0] for r in rows], preds, rows)
    official = _official_evaluate([r["answers"] for r in rows], preds)
    assert got["em"] == pytest.approx(official["em"], abs=1e-9)
    assert got["f1"] == pytest.approx(official["f1"], abs=1e-9)
    assert 40 < got["em"] < 90


# --- CoNLL-2003 --------------------------------------------------------------------------------------------------


def _spans_to_iob2(spans, n):
    tags = ["O"] * n
    for kind, s, e in spans:
        tags[s] = f"B-{kind}"
        for i in range(s + 1, e + 1):
            tags[i] = f"I-{kind}"
    return tags


def test_iob1_spans_match_seqeval(data_dir):
    rows = seqio.get_mixture_or_task("conll2003_ner").source.read_rows("validation")
    # IOB1 "B-" appears only between adjacent same-type entities; both must split there.
    assert tags_to_spans(["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-ORG"]) == [
        ("PER", 0, 1), ("PER", 2, 2), ("LOC", 4, 4), ("ORG", 5, 5)]
    n_entities = sum(len(tags_to_spans(r["tags"])) for r in rows)
    assert n_entities == 5942  # the entity count of eng.testa reported by conlleval


def test_ner_roundtrip_and_seqeval_equality(data_dir):
    rows = seqio.get_mixture_or_task("conll2003_ner").source.read_rows("validation")
    rng = np.random.default_rng(3)
    gold_tags, pred_tags, targets, preds = [], [], [], []
    ambiguous = 0
    for r in rows:
        tokens, spans = r["tokens"], tags_to_spans(r["tags"])
        assert parse_entities(format_entities(tokens, spans), tokens) == (spans, 0)  # gold maps back exactly
        pred = []
        for kind, s, e in spans:
            draw = rng.random()
            if draw < 0.1:
                continue  # missed
            if draw < 0.2:
                kind = "MISC" if kind != "MISC" else "PER"  # wrong type
            elif draw < 0.25 and e > s:
                e -= 1  # wrong boundary
            pred.append((kind, s, e))
        text = format_entities(tokens, pred)
        decoded, invalid = parse_entities(text, tokens)
        assert invalid == 0
        ambiguous += decoded != pred  # the same words twice in a sentence: the text names the first occurrence
        gold_tags.append(_spans_to_iob2(spans, len(tokens)))
        pred_tags.append(_spans_to_iob2(decoded, len(tokens)))
        targets.append(format_entities(tokens, spans))
        preds.append(text)
    assert ambiguous < 0.01 * len(rows)
    got = _score("conll2003_ner", targets, preds, rows)
    # Our numbers are seqeval's on the spans the predicted texts map to.
    assert got["ner_precision"] == pytest.approx(100 * precision_score(gold_tags, pred_tags))
    assert got["ner_recall"] == pytest.approx(100 * recall_score(gold_tags, pred_tags))
    assert got["ner_f1"] == pytest.approx(100 * f1_score(gold_tags, pred_tags))
    assert 60 < got["ner_f1"] < 95


def test_ner_unparseable_output_counts_as_wrong():
    tokens = "Peter Blackburn visited BRUSSELS .".split()
    assert parse_entities("PER: Peter Blackburn ; LOC: BRUSSELS", tokens) == ([("PER", 0, 1), ("LOC", 3, 3)], 0)
    assert parse_entities("none", tokens) == ([], 0)
    assert parse_entities("PER Peter ; XYZ: BRUSSELS ; LOC: Paris ; LOC:", tokens) == ([], 4)
    assert parse_entities("LOC: BRUSSELS ; PER: Peter", tokens) == ([("LOC", 3, 3), ("PER", 0, 0)], 0)
    assert parse_entities("LOC: BRUSSELS ; LOC: BRUSSELS", tokens) == ([("LOC", 3, 3)], 1)
    example = {"tokens": [t.encode() for t in tokens], "tags": [b"I-PER", b"I-PER", b"O", b"I-LOC", b"O"]}
    got = _score("conll2003_ner", ["PER: Peter Blackburn ; LOC: BRUSSELS"] * 2,
                 ["PER: Peter Blackburn ; garbage ;;", "\x00\x01 ::: ;"], [example, example])
    assert got["ner_precision"] == pytest.approx(100 * 1 / 3)  # 1 right, 2 invalid items ("garbage", "\x00\x01 :::")
    assert got["ner_recall"] == pytest.approx(100 * 1 / 4)
