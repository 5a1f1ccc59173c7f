"""Unsupervised objectives of the T5 paper on plain text, built from `t5.data.preprocessors`.

The corpus is every `text/**/*.txt` under the data directory (one example per non-empty line; about 1% of lines,
chosen by a hash of the line, form the validation split). `register_text_tasks` registers the same objectives over
any files a user names.

- `span_corruption`: T5's objective (noise density 0.15, mean span length 3, unique sentinels).
- `bert_mlm`: BERT-style masking in text-to-text form: 15% of tokens chosen i.i.d.; of those 80% become the mask
  sentinel, 10% a random token, 10% stay; the target is the original text.
- `iid_denoising`: 15% of tokens chosen i.i.d., each run of them replaced by one unique sentinel; the target lists
  the dropped runs after their sentinels (the paper's "replace corrupted spans").
- `prefix_lm`: a random prefix as input, the rest as target.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import seqio
import tensorflow as tf
from t5.data import preprocessors as t5p

from mtplatform import mixing
from tasks.common import OUTPUT_FEATURES
from tasks.sources import FileSource, in_text_validation_split, read_text_lines, text_files

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0
MASK_PROB, RANDOM_PROB = 0.8, 0.1  # of the chosen tokens; the remaining 10% are kept


def bert_style_inputs(tokens: tf.Tensor, noise_mask: tf.Tensor, vocabulary: seqio.Vocabulary, seeds) -> tf.Tensor:
    """BERT's 80/10/10 corruption of the noise tokens: mask sentinel, random token, or unchanged."""
    draw = tf.random.stateless_uniform(tf.shape(tokens), seed=seeds[0])
    masked = t5p.noise_token_to_sentinel(tokens, noise_mask, vocabulary, seeds=())
    randomised = t5p.noise_token_to_random_token(tokens, noise_mask, vocabulary, seeds=seeds[1:])
    return tf.where(draw < MASK_PROB, masked, tf.where(draw < MASK_PROB + RANDOM_PROB, randomised, tokens))


_TEXT_TO_TARGETS = [
    functools.partial(seqio.preprocessors.rekey, key_map={"inputs": None, "targets": "text"}),
    seqio.preprocessors.tokenize,
]
# The paper's chunking for i.i.d. objectives: random chunk of a document, concatenate, split to the input length.
_CHUNKS = [t5p.select_random_chunk, t5p.reduce_concat_tokens, t5p.split_tokens_to_inputs_length]

OBJECTIVES: dict[str, list] = {
    "span_corruption": [
        functools.partial(
            t5p.span_corruption, noise_density=NOISE_DENSITY, mean_noise_span_length=MEAN_NOISE_SPAN_LENGTH
        ),
    ],
    "bert_mlm": [
        *_CHUNKS,
        functools.partial(
            t5p.denoise,
            noise_density=NOISE_DENSITY,
            noise_mask_fn=t5p.iid_noise_mask,
            inputs_fn=bert_style_inputs,
            targets_fn=None,  # the original text
        ),
    ],
    "iid_denoising": [
        *_CHUNKS,
        functools.partial(
            t5p.denoise,
            noise_density=NOISE_DENSITY,
            noise_mask_fn=t5p.iid_noise_mask,
            inputs_fn=t5p.noise_span_to_unique_sentinel,
            targets_fn=t5p.nonnoise_span_to_unique_sentinel,
        ),
    ],
    "prefix_lm": [t5p.prefix_lm],
}


def text_source(name: str, patterns: Sequence[str]) -> FileSource:
    """Lines of the files matching `patterns`, split into train and validation by `in_text_validation_split`."""

    def read(path, split):
        keep = in_text_validation_split if split == "validation" else lambda line: not in_text_validation_split(line)
        return read_text_lines(path, keep_line=keep)

    files = text_files(patterns)
    return FileSource(name, {"train": files, "validation": files}, reader=read)


def register_text_tasks(prefix: str, patterns: Sequence[str]) -> list[str]:
    """Register every objective over the text files matching `patterns` as `<prefix>_<objective>`; return names."""
    names = []
    # One source for all objectives: its lines are read (and counted, for rate functions) once, not per objective.
    source = text_source(f"{prefix or 'unsupervised'} text tasks ({', '.join(patterns)})", patterns)
    for objective, steps in OBJECTIVES.items():
        name = f"{prefix}_{objective}" if prefix else objective
        seqio.TaskRegistry.add(
            name,
            source=source,
            preprocessors=[*_TEXT_TO_TARGETS, *steps, seqio.preprocessors.append_eos_after_trim],
            output_features=OUTPUT_FEATURES,
            metric_fns=[],
        )
        mixing.UNSUPERVISED_TASKS.add(name)  # its size is arbitrary: mixing rates use an artificial one
        names.append(name)
    return names


UNSUPERVISED_TASKS = tuple(register_text_tasks("", ["text/**/*.txt"]))
