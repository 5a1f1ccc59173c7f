"""CoNLL-2003 English NER as text-to-text, scored on entity spans like `seqeval` / conlleval.

Format: inputs `ner: <tokens joined by spaces>`; targets the entities in sentence order as `TYPE: words`, joined by
` ; `, or `none` for a sentence without entities, e.g.

    ner: EU rejects German call to boycott British lamb .
    ORG: EU ; MISC: German ; MISC: British

A prediction maps back to spans by finding each entity's words in the sentence's tokens, left to right from the end
of the previous match (then anywhere, if the model listed entities out of order). Entity-level micro precision,
recall and F1 compare (type, first token, last token) triples, as seqeval's default mode does on IOB tags.
Output that does not parse, names an unknown type or words that are not in the sentence counts as a wrong
prediction (a false positive), never as a crash.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import seqio
import tensorflow as tf

from mtplatform import stats
from tasks.common import OUTPUT_FEATURES, tokenized_and_cached
from tasks.sources import NER_TYPES, FileSource, Row, read_conll

Span = tuple[str, int, int]  # (type, first token, last token), inclusive
NO_ENTITIES = "none"
ENTITY_SEP = " ; "


def tags_to_spans(tags: Sequence[str]) -> list[Span]:
    """Entity spans of an IOB1 or IOB2 tag sequence (an `I-X` after `O` or another type starts an entity)."""
    spans: list[Span] = []
    start, kind = None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, tag_type = tag.partition("-")
        continues = prefix == "I" and tag_type == kind
        if start is not None and not continues:
            spans.append((kind, start, i - 1))
            start, kind = None, None
        if prefix in ("B", "I") and not continues:
            start, kind = i, tag_type
    return spans


def format_entities(tokens: Sequence[str], spans: Sequence[Span]) -> str:
    """The target text for a sentence's entity spans."""
    if not spans:
        return NO_ENTITIES
    return ENTITY_SEP.join(f"{kind}: {' '.join(tokens[s : e + 1])}" for kind, s, e in spans)


def parse_entities(text: str, tokens: Sequence[str]) -> tuple[list[Span], int]:
    """Spans a predicted target text names in `tokens`, and how many of its items were invalid."""
    text = text.strip()
    if text == NO_ENTITIES or not text:
        return [], 0
    spans: list[Span] = []
    invalid = 0
    cursor = 0
    for item in text.split(ENTITY_SEP.strip()):
        if not item.strip():
            continue  # "a ; ; b" or a trailing separator: nothing was claimed
        kind, sep, words = item.strip().partition(":")
        words_list = words.split()
        if not sep or kind.strip() not in NER_TYPES or not words_list:
            invalid += 1
            continue
        start = _find(tokens, words_list, cursor)
        if start is None:
            start = _find(tokens, words_list, 0)
        span = (kind.strip(), start, start + len(words_list) - 1) if start is not None else None
        if span is None or span in spans:
            invalid += 1
            continue
        spans.append(span)
        cursor = span[2] + 1
    return spans, invalid


def _find(tokens: Sequence[str], words: Sequence[str], begin: int) -> int | None:
    n = len(words)
    for i in range(begin, len(tokens) - n + 1):
        if list(tokens[i : i + n]) == list(words):
            return i
    return None


def ner_postprocessor(output: Any, example: dict | None = None, is_target: bool = False) -> dict:
    """Target -> the gold spans; prediction -> the spans it names in the example's tokens, plus invalid items."""
    tokens = [_text(t) for t in example["tokens"]]
    if is_target:
        return {"spans": tags_to_spans([_text(t) for t in example["tags"]]), "invalid": 0}
    spans, invalid = parse_entities(_text(output), tokens)
    return {"spans": spans, "invalid": invalid}


def span_f1(targets: Sequence[dict], predictions: Sequence[dict]) -> dict[str, float]:
    """Entity-level micro precision, recall and F1 (in percent, like the GLUE metrics)."""
    return {key: float(value) for key, value in _span_scores(span_counts(targets, predictions).sum(axis=0)).items()}


def span_counts(targets: Sequence[dict], predictions: Sequence[dict]) -> np.ndarray:
    """(n, 3) each example's true positive, false positive and false negative entities (an invalid item of a
    prediction is a false positive)."""
    counts = []
    for gold, pred in zip(targets, predictions, strict=True):
        gold_spans, pred_spans = set(gold["spans"]), set(pred["spans"])
        hits = len(gold_spans & pred_spans)
        counts.append((hits, len(pred_spans) - hits + pred["invalid"], len(gold_spans) - hits))
    return np.array(counts, dtype=np.float64).reshape(-1, 3)


def _span_scores(sums: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall and F1 of (..., 3) summed counts; 0 where undefined."""
    tp, fp, fn = np.moveaxis(np.asarray(sums, dtype=np.float64), -1, 0)
    precision, recall = stats.divide_or_zero(tp, tp + fp), stats.divide_or_zero(tp, tp + fn)
    f1 = stats.divide_or_zero(2 * precision * recall, precision + recall)
    return {"ner_precision": 100 * precision, "ner_recall": 100 * recall, "ner_f1": 100 * f1}


# All 1,000 bootstrap resamples at once: the counts summed per resample (`stats.register_replicates`).
stats.register_replicates(span_f1, lambda targets, predictions, indices: _span_scores(
    stats.resampled_sums(span_counts(targets, predictions), indices)))


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def read_conll_text_to_text(path: Path, split: str) -> list[Row]:
    """CoNLL sentences with their input sentence and target entity text."""
    rows = []
    for row in read_conll(path):
        rows.append({**row, "sentence": " ".join(row["tokens"]),
                     "entities": format_entities(row["tokens"], tags_to_spans(row["tags"]))})
    return rows


@seqio.map_over_dataset
def ner_text_to_text(x: dict) -> dict:
    return {
        "inputs": tf.strings.join(["ner:", x["sentence"]], separator=" "),
        "targets": x["entities"],
        "tokens": x["tokens"],
        "tags": x["tags"],
    }


seqio.TaskRegistry.add(
    "conll2003_ner",
    source=FileSource(
        "conll2003_ner",
        {"train": "conll2003/eng.train", "validation": "conll2003/eng.testa", "test": "conll2003/eng.testb"},
        reader=read_conll_text_to_text,
        num_input_examples={"train": 14041, "validation": 3250, "test": 3453},
    ),
    preprocessors=tokenized_and_cached(ner_text_to_text),
    postprocess_fn=ner_postprocessor,
    metric_fns=[span_f1],
    output_features=OUTPUT_FEATURES,
)
