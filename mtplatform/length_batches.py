"""Evaluation batches of similar input length, each trimmed to its longest row.

seqio's Evaluator pads every example of a split to one length (the task's feature length, or else the split's
longest example) and hands the predict function the examples in their order, so a batch of short sentences runs the
encoder, and every decoding step's cross-attention, over the padding the longest example needs. Sorted by input
length before batching (what transformers' `group_by_length` does for training) and trimmed to its longest row,
each batch computes the same figures over the tokens that are there: T5's attention masks padded keys out, its
relative position bias depends on position pairs alone, and the decoder's self-attention is causal, so columns of
padding after the last token change nothing but float rounding. Every example keeps its seqio index, and seqio puts
predictions back in its order by it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from mtplatform.tf_setup import without_autotune

FEATURES = ("encoder_input_tokens", "decoder_target_tokens")
"""What evaluation reads of seqio's EncDecFeatureConverter features (decoding the first, scoring both)."""

Batch = tuple[np.ndarray, dict[str, np.ndarray]]  # (seqio indices, FEATURES as (rows, width) token ids, 0 = padding)


def batches(dataset: tf.data.Dataset, batch_size: int, by_length: bool = True) -> Iterator[Batch]:
    """`dataset`'s (index, features) examples in batches of `batch_size`: by input length, longest first (a split's
    peak memory comes with its first batch), each feature trimmed to the batch's longest row; or, where not
    `by_length`, in seqio's order and padded as seqio padded them (what a seqio predict function sees). A dataset
    is read once while it lives (`_materialized`): an evaluation split, the same examples every time."""
    indices, features = _materialized(dataset, batch_size)
    order = (np.argsort(-lengths(features[FEATURES[0]]), kind="stable") if by_length
             else np.arange(len(indices)))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        chosen = {name: features[name][rows] for name in FEATURES}
        yield indices[rows], ({name: _trimmed(tokens) for name, tokens in chosen.items()} if by_length else chosen)


def lengths(tokens: np.ndarray) -> np.ndarray:
    """(rows,) each row's length: one past its last non-padding token (0 for a row of padding alone)."""
    filled = tokens != 0
    return np.where(filled.any(1), tokens.shape[1] - np.argmax(filled[:, ::-1], axis=1), 0)


def _trimmed(tokens: np.ndarray) -> np.ndarray:
    """`tokens` without the columns after every row's last token (at least one column)."""
    return tokens[:, :max(1, int(lengths(tokens).max(initial=0)))]


_READ: weakref.WeakKeyDictionary[tf.data.Dataset, Batch] = weakref.WeakKeyDictionary()
"""Each evaluation dataset's examples, read once while the dataset lives."""


def _materialized(dataset: tf.data.Dataset, batch_size: int) -> Batch:
    """All of `dataset` as numpy: (indices, {feature: (rows, width)}); a validation split fits in memory (SQuAD's
    10,570 examples at 512 input tokens are some 20 MiB).

    Read once per dataset object: seqio's Evaluator hands the same cached, unshuffled split to the decoding and
    scoring of every checkpoint it evaluates, and making its iterator took about 0.2 s a task each time (17 s of
    an experiment of 12 stages evaluating 7 tasks). Callers index the arrays, which copies; nothing writes them.
    """
    if dataset not in _READ:
        _READ[dataset] = _read(dataset, batch_size)
    return _READ[dataset]


def _read(dataset: tf.data.Dataset, batch_size: int) -> Batch:
    parts = list(without_autotune(dataset.batch(batch_size)).as_numpy_iterator())
    if not parts:
        return np.zeros(0, dtype=np.int64), {name: np.zeros((0, 1), dtype=np.int32) for name in FEATURES}
    indices = np.concatenate([part[0] for part in parts])
    return indices, {name: np.concatenate([part[1][name] for part in parts]) for name in FEATURES}
