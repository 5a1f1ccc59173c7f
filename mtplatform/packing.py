"""First-fit packing of examples into fixed-length rows, in TensorFlow ops (so tf.data checkpoints it).

seqio's `trim_and_pack_dataset` packs without its custom ops (which need tensor2tensor's compiled binary, not
built for current TensorFlow) by *next fit*: it keeps one open row and closes it whenever an example does not fit.
A mixture of long examples (span corruption fills a 512/114 row alone) and short ones (a GLUE pair is 20-100
tokens) then leaves a third of every row padding: 67.6% of input positions held tokens on
`span_corruption_and_glue` at 512/114. This packer keeps every row of the buffer open and puts each example into
the first row where all of its features fit (*first fit*), in the stream's order; the output has seqio's layout
(`<key>`, `<key>_segment_ids`, `<key>_positions`) and buffer (as many examples as the longest feature), so seqio's
feature converters take it unchanged. Examples are never cut beyond the feature lengths, split, or dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import tensorflow as tf


def pack_dataset(ds: tf.data.Dataset, feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    """`ds`'s examples (1-D integer features, 0 = padding) trimmed to `feature_lengths` and packed first-fit into
    rows of exactly those lengths, with 1-based segment ids (the example's place in its row) and positions."""
    keys = list(feature_lengths)
    for key in keys:
        if key not in ds.element_spec:
            raise ValueError(f"packing: feature {key!r} not in the dataset; it has {sorted(ds.element_spec)}")
    trimmed = ds.map(_as_written(lambda ex: {k: ex[k][:feature_lengths[k]] for k in keys}),
                     num_parallel_calls=tf.data.AUTOTUNE)
    buffer = max(feature_lengths.values())  # seqio's choice: enough examples to fill at least one row
    batched = trimmed.padded_batch(buffer, padded_shapes={k: [-1] for k in keys})
    packed = batched.map(_as_written(lambda batch: _pack_batch(batch, feature_lengths)),
                         num_parallel_calls=tf.data.AUTOTUNE)
    return packed.unbatch().map(_as_written(lambda ex: _set_shapes(ex, feature_lengths)),
                                num_parallel_calls=tf.data.AUTOTUNE)


def _as_written(fn: Callable) -> Callable:
    """`fn` traced as written, not rewritten by autograph first. This module's loops and branches over tensors are
    TensorFlow's own (`tf.while_loop`, `tf.cond`), so autograph's rewrite (parsing and transforming each function's
    source, again in every process) changes nothing but the start-up: 0.9 s of a `mtp train` on the AVX2 EPYC."""
    return tf.autograph.experimental.do_not_convert(fn)


def _sizes(batch: Mapping[str, tf.Tensor], keys: list[str]) -> tf.Tensor:
    """[examples, features]: each example's length per feature (its non-padding tokens, as seqio counts them)."""
    return tf.stack([tf.reduce_sum(tf.cast(tf.not_equal(batch[k], 0), tf.int32), axis=1) for k in keys], axis=1)


def _assign_rows(sizes: tf.Tensor, limits: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """First fit: for each example in order, the first row with room for every feature (a new row if none).
    Returns (row per example, start offset per example and feature, segment id per example, number of rows)."""
    n = tf.shape(sizes)[0]
    num_features = tf.shape(sizes)[1]

    def place(i, used, count, rows, row_of, offsets, segments):
        size = sizes[i]
        fits = tf.reduce_all(used + size[None, :] <= limits[None, :], axis=1) & (tf.range(n) < rows)
        row = tf.cond(tf.reduce_any(fits), lambda: tf.cast(tf.argmax(tf.cast(fits, tf.int32)), tf.int32),
                      lambda: rows)
        row_of = tf.tensor_scatter_nd_update(row_of, [[i]], [row])
        offsets = tf.tensor_scatter_nd_update(offsets, [[i]], [used[row]])
        segments = tf.tensor_scatter_nd_update(segments, [[i]], [count[row] + 1])
        used = tf.tensor_scatter_nd_add(used, [[row]], [size])
        count = tf.tensor_scatter_nd_add(count, [[row]], [1])
        return i + 1, used, count, tf.maximum(rows, row + 1), row_of, offsets, segments

    zeros = tf.zeros([n], tf.int32)
    _, _, _, rows, row_of, offsets, segments = tf.while_loop(
        lambda i, *_: i < n, place,
        (tf.constant(0), tf.zeros([n, num_features], tf.int32), zeros, tf.constant(0), zeros,
         tf.zeros([n, num_features], tf.int32), zeros))
    return row_of, offsets, segments, rows


def _pack_batch(batch: Mapping[str, tf.Tensor], feature_lengths: Mapping[str, int]) -> dict[str, tf.Tensor]:
    """One padded batch of examples -> its packed rows (a variable number of them)."""
    keys = list(feature_lengths)
    sizes = _sizes(batch, keys)
    limits = tf.constant([feature_lengths[k] for k in keys], tf.int32)
    row_of, offsets, segments, rows = _assign_rows(sizes, limits)
    out = {}
    for f, key in enumerate(keys):
        values = tf.cast(batch[key], tf.int32)
        valid = tf.sequence_mask(sizes[:, f], tf.shape(values)[1])
        where = tf.cast(tf.where(valid), tf.int32)  # [tokens, 2]: (example, position in it)
        example, position = where[:, 0], where[:, 1]
        target = tf.stack([tf.gather(row_of, example), tf.gather(offsets[:, f], example) + position], axis=1)
        shape = tf.stack([rows, feature_lengths[key]])
        out[key] = tf.scatter_nd(target, tf.gather_nd(values, where), shape)
        out[f"{key}_positions"] = tf.scatter_nd(target, position, shape)
        out[f"{key}_segment_ids"] = tf.scatter_nd(target, tf.gather(segments, example), shape)
    return out


def _set_shapes(example: dict[str, tf.Tensor], feature_lengths: Mapping[str, int]) -> dict[str, tf.Tensor]:
    for key, value in example.items():
        base = next(k for k in feature_lengths if key in (k, f"{k}_positions", f"{k}_segment_ids"))
        value.set_shape([feature_lengths[base]])
    return example
