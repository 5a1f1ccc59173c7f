"""Pretraining objectives as seqio preprocessors: T5's (Tables 4 to 7), BERT's, SpanBERT's, BART's, NSP, ALBERT's
sentence order, ELECTRA's replaced tokens, GPT's left-to-right LM and ERNIE's entity and phrase masking.

Each objective is one function `(dataset, sequence_length, output_features)` over text already tokenized into
"targets" (NSP, SOP and ERNIE's take the raw "text"); `OBJECTIVES` maps registry names to them and
`tasks.unsupervised` registers each over any text source. Their parameters are gin-configurable
(`objectives.span_corruption.noise_density = 0.5`) and read when a dataset is built, so a run's gin file (or an
experiment stage's scope) sets them.

Lengths: every objective cuts its text into chunks sized from the run's feature lengths, so that a target never
needs truncating: objectives whose target is the whole chunk (BERT-style, BART, deshuffling, prefix LM) cut at
min(inputs, targets) - 1 tokens; those whose target holds the corrupted tokens size the chunk so that the largest
possible target fits. Lengths too short for a useful chunk are an error naming the objective and the lengths.

Random choices use seqio's per-example stateless seeds, so a dataset is reproducible from `get_dataset(seed=...)`
and its iterator can be checkpointed. Noise counts are exact (round(length * density) tokens, as T5's span
corruption), not Bernoulli draws, which is also what lets the target bounds above be exact.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import gin
import numpy as np
import seqio
import tensorflow as tf
from t5.data import preprocessors as t5p

from mtplatform import validation
from tasks import knowledge_units

MIN_CHUNK = 8  # tokens; shorter chunks teach nothing and mean the lengths are a mistake
MIN_NOISED = 3  # words (SpanBERT) or tokens (BART): the last piece of a corpus may be shorter, and stays clean
NO_LENGTHS = {"inputs": 512, "targets": 512}  # where a dataset is built without lengths (`mtp tasks show`)
WORD_START = "\u2581"  # SentencePiece's marker of a piece that starts a word
SENTENCE_END = (".", "!", "?", '."', '?"', '!"')


# --- parameters: each in its range, checked when the dataset is built (before any example) ------------------

# A noise density of 0 trains nothing, one of 1 or more leaves no text to predict from (and sends t5's span helper
# into an endless loop): both ends are open.
_RANGES: dict[str, tuple[float, float, bool, bool, str]] = {
    "noise_density": (0.0, 1.0, True, True, "the share of tokens corrupted"),
    "mean_noise_span_length": (1.0, float("inf"), False, False, "tokens per span"),
    "mask_prob": (0.0, 1.0, False, False, "the share of chosen tokens masked"),
    "random_prob": (0.0, 1.0, False, False, "the share of chosen tokens made random"),
    "geometric_p": (0.0, 1.0, True, False, "the geometric distribution's p"),
    "poisson_lambda": (0.0, float("inf"), True, False, "the mean span length"),
}


def _check(objective: str, **params: object) -> None:
    """One-line errors naming `objectives.<objective>.<parameter>` and its valid range."""
    for name, value in params.items():
        setting = f"objectives.{objective}.{name}"
        if name in ("max_span_words", "negative_block"):
            validation.whole_number(setting, value, 1 if name == "max_span_words" else 2)
            continue
        low, high, low_open, high_open, meaning = _RANGES[name]
        validation.number_in(setting, value, low, high, low_open=low_open, high_open=high_open, meaning=meaning)
    if params.get("mask_prob", 0) + params.get("random_prob", 0) > 1:
        raise ValueError(f"objectives.{objective}: mask_prob {params['mask_prob']} + random_prob "
                         f"{params['random_prob']} is more than 1")


# --- chunking: the lengths decide the chunk --------------------------------------------------------------------


def chunk_length(objective: str, sequence_length: Mapping[str, int] | None,
                 targets_needed: Callable[[int], float] = lambda n: n + 1) -> int:
    """The longest chunk n (at most inputs - 1, for EOS) whose target, EOS included, fits the run's targets length;
    or a one-line error."""
    lengths = {**NO_LENGTHS, **(sequence_length or {})}
    n = lengths["inputs"] - 1
    while n >= MIN_CHUNK and targets_needed(n) > lengths["targets"]:
        n -= 1
    if n < MIN_CHUNK:
        raise ValueError(f"objective {objective}: TASK_FEATURE_LENGTHS inputs {lengths['inputs']}, targets "
                         f"{lengths['targets']} leave chunks under {MIN_CHUNK} tokens (its target would be cut); "
                         "raise the lengths")
    return n


def chunks(dataset: tf.data.Dataset, output_features, length: int, concatenate: bool = True) -> tf.data.Dataset:
    """T5's chunking: a random chunk of each document, documents concatenated (unless not `concatenate`), then
    split into pieces of at most `length` tokens."""
    ds = t5p.select_random_chunk(dataset, output_features=output_features, feature_key="targets", max_length=65536)
    if concatenate:
        ds = t5p.reduce_concat_tokens(ds, feature_key="targets", batch_size=128)
    return t5p.split_tokens(ds, feature_key="targets", min_tokens_per_segment=None, max_tokens_per_segment=length)


# --- noise: which tokens, and what becomes of them ---------------------------------------------------------------


def num_noise(length: tf.Tensor, density: float) -> tf.Tensor:
    """round(length * density), at least 1 and at most length - 1 (where length allows)."""
    k = tf.cast(tf.math.round(tf.cast(length, tf.float32) * density), tf.int32)
    return tf.clip_by_value(k, tf.minimum(1, length), tf.maximum(length - 1, 1))


def exact_noise_mask(length: tf.Tensor, density: float, seed: tf.Tensor) -> tf.Tensor:
    """Exactly num_noise(length, density) tokens, chosen uniformly without replacement."""
    order = tf.random.experimental.stateless_shuffle(tf.range(length), seed=seed)
    return tf.scatter_nd(order[:, None], tf.range(length) < num_noise(length, density), [length])


def random_segmentation(num_items: tf.Tensor, num_segments: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Lengths of `num_segments` segments, each at least 1, summing to `num_items`; uniform over such splits."""
    cuts = tf.random.experimental.stateless_shuffle(tf.range(1, num_items), seed=seed)[:num_segments - 1]
    bounds = tf.concat([[0], tf.sort(cuts), [num_items]], axis=0)
    return bounds[1:] - bounds[:-1]


def place_spans(num_items: tf.Tensor, span_lengths: tf.Tensor,
                seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Spans of the given lengths at random non-overlapping places, with at least one clean item between two:
    per item, whether it is noise and which span it belongs to; and per span, the item it starts at."""
    m = tf.size(span_lengths)
    gaps = random_segmentation(num_items - tf.reduce_sum(span_lengths), m + 1, seed)
    segments = tf.reshape(tf.stack([gaps[:-1], span_lengths], axis=1), [-1])
    segments = tf.concat([segments, gaps[-1:]], axis=0)  # gap, span, gap, span, ..., gap
    is_span = tf.range(2 * m + 1) % 2 == 1
    noise = tf.repeat(is_span, segments)
    span_of_item = tf.repeat(tf.range(2 * m + 1) // 2, segments)
    starts = tf.cumsum(segments, exclusive=True)[1::2]
    return noise, span_of_item, starts


def budgeted_spans(lengths: tf.Tensor, budget: tf.Tensor, max_spans: tf.Tensor) -> tf.Tensor:
    """The prefix of sampled span `lengths` that covers exactly `budget` items (the last span cut to fit), as
    BART samples its spans; at most `max_spans` of them, so that clean items can separate them."""
    covered = tf.cumsum(lengths)
    m = tf.minimum(tf.reduce_sum(tf.cast(covered < budget, tf.int32)) + 1, tf.maximum(max_spans, 1))
    kept = lengths[:m]
    return tf.concat([kept[:-1], [budget - tf.reduce_sum(kept[:-1])]], axis=0)


def first_random_id(vocabulary: seqio.Vocabulary) -> tuple[int, int]:
    """The range of ordinary pieces a random replacement is drawn from: after pad, EOS and unk; before sentinels."""
    return 3, vocabulary.vocab_size - getattr(vocabulary, "extra_ids", 0)


def bert_corrupt(tokens: tf.Tensor, noise: tf.Tensor, choice: tf.Tensor, vocabulary: seqio.Vocabulary,
                 seed: tf.Tensor, mask_prob: float, random_prob: float) -> tf.Tensor:
    """BERT's rule on the noise tokens: where `choice` (uniform in [0, 1)) < mask_prob the mask sentinel, below
    mask_prob + random_prob a random ordinary piece, else unchanged."""
    low, high = first_random_id(vocabulary)
    random_ids = tf.random.stateless_uniform(tf.shape(tokens), seed=seed, minval=low, maxval=high, dtype=tokens.dtype)
    mask = tf.fill(tf.shape(tokens), tf.cast(t5p.sentinel_id(vocabulary), tokens.dtype))
    replaced = tf.where(choice < mask_prob, mask, tf.where(choice < mask_prob + random_prob, random_ids, tokens))
    return tf.where(noise, replaced, tokens)


@functools.lru_cache(maxsize=8)
def _piece_table(model_file: str, vocab_size: int, kind: str) -> np.ndarray:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    table = np.zeros(vocab_size, dtype=bool)
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        table[i] = piece.startswith(WORD_START) if kind == "word_start" else piece.endswith(SENTENCE_END)
    return table


def piece_table(vocabulary: seqio.Vocabulary, kind: str) -> tf.Tensor:
    """Per id, whether its piece starts a word (`kind="word_start"`) or ends a sentence (`"sentence_end"`)."""
    return tf.constant(_piece_table(vocabulary.sentencepiece_model_file, vocabulary.vocab_size, kind))


def word_ids(tokens: tf.Tensor, word_start: tf.Tensor) -> tf.Tensor:
    """Per token, the index of its word in the chunk (the chunk's first token starts a word)."""
    starts = tf.gather(word_start, tokens)
    starts = tf.concat([[True], starts[1:]], axis=0)
    return tf.cumsum(tf.cast(starts, tf.int32)) - 1


def _vocabulary(output_features) -> seqio.Vocabulary:
    return output_features["targets"].vocabulary


# --- T5's objectives -------------------------------------------------------------------------------------------


@gin.configurable(module="objectives", denylist=["dataset", "sequence_length", "output_features"])
def span_corruption(dataset, sequence_length, output_features, noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0):
    """T5's objective: spans (mean length `mean_noise_span_length`) covering `noise_density` of the tokens, each
    replaced by a unique sentinel; the target lists the spans after their sentinels (Tables 6 and 7's knobs)."""
    _check("span_corruption", noise_density=noise_density, mean_noise_span_length=mean_noise_span_length)
    lengths = {**NO_LENGTHS, **(sequence_length or {})}
    _, needed = t5p.random_spans_helper(inputs_length=lengths["inputs"], noise_density=noise_density,
                                        mean_noise_span_length=mean_noise_span_length,
                                        extra_tokens_per_span_inputs=1, extra_tokens_per_span_targets=1)
    if needed > lengths["targets"]:
        raise ValueError(f"objective span_corruption (noise_density {noise_density}, mean span "
                         f"{mean_noise_span_length}): inputs length {lengths['inputs']} needs targets length "
                         f"{needed}, TASK_FEATURE_LENGTHS gives {lengths['targets']}; raise it or lower the inputs")
    return t5p.span_corruption(dataset, lengths, output_features, noise_density=noise_density,
                               mean_noise_span_length=mean_noise_span_length)


def _iid_denoise(dataset, output_features, noise_density, inputs_fn, targets_fn):
    return t5p.denoise(dataset, output_features, noise_density=noise_density,
                       noise_mask_fn=lambda length, density, seeds: exact_noise_mask(length, density, seeds[0]),
                       inputs_fn=inputs_fn, targets_fn=targets_fn)


@gin.configurable(module="objectives", denylist=["dataset", "sequence_length", "output_features"])
def iid_denoising(dataset, sequence_length, output_features, noise_density: float = 0.15):
    """T5's "replace corrupted spans": i.i.d. noise tokens, each run of them one unique sentinel in the inputs; the
    target lists the runs after their sentinels. A chunk holds at most as many noise tokens as there are sentinels
    (100), so that no run borrows an ordinary piece's id as its sentinel."""
    _check("iid_denoising", noise_density=noise_density)
    sentinels = getattr(_vocabulary(output_features), "extra_ids", 100)

    def targets_needed(n: int) -> float:
        k = _noise_count(n, noise_density)  # k noise tokens make at most k runs: k tokens and k sentinels
        return 2 * k + 1 if k <= sentinels else float("inf")

    ds = chunks(dataset, output_features, chunk_length("iid_denoising", sequence_length, targets_needed))
    return _iid_denoise(ds, output_features, noise_density, t5p.noise_span_to_unique_sentinel,
                        t5p.nonnoise_span_to_unique_sentinel)


@gin.configurable(module="objectives", denylist=["dataset", "sequence_length", "output_features"])
def drop_corrupted_tokens(dataset, sequence_length, output_features, noise_density: float = 0.15):
    """T5's "drop corrupted tokens": i.i.d. noise tokens removed from the inputs; the target is them, in order."""
    _check("drop_corrupted_tokens", noise_density=noise_density)
    n = chunk_length("drop_corrupted_tokens", sequence_length,
                     targets_needed=lambda n: _noise_count(n, noise_density) + 1)
    ds = chunks(dataset, output_features, n)
    return _iid_denoise(ds, output_features, noise_density, t5p.drop_noise_tokens, t5p.drop_nonnoise_tokens)


def _noise_count(n: int, density: float) -> int:
    return min(max(round(n * density), 1), max(n - 1, 1))


def prefix_lm(dataset, sequence_length, output_features):
    """T5's prefix language modelling: a random prefix of the chunk as inputs, the rest as target. A one-token
    piece (a document's last) has no prefix and continuation: it is left out."""
    ds = chunks(dataset, output_features, chunk_length("prefix_lm", sequence_length), concatenate=False)
    ds = ds.filter(lambda features: tf.size(features["targets"]) >= 2)
    return t5p.denoise(ds, output_features, noise_density=0.5, noise_mask_fn=t5p.random_prefix_noise_mask,
                       inputs_fn=t5p.drop_nonnoise_tokens, targets_fn=t5p.drop_noise_tokens)


def deshuffling(dataset, sequence_length, output_features):
    """T5's deshuffling (Table 4): the chunk's tokens shuffled as inputs, the original order as target."""
    ds = chunks(dataset, output_features, chunk_length("deshuffling", sequence_length))

    @seqio.map_over_dataset(num_seeds=1)
    def shuffle(features, seed):
        tokens = features["targets"]
        return {"inputs": tf.random.experimental.stateless_shuffle(tokens, seed=seed), "targets": tokens}

    return shuffle(ds)


# --- BERT and SpanBERT ------------------------------------------------------------------------------------------


def _bert_style(name: str, dataset, sequence_length, output_features, choose, num_seeds: int, mask_prob: float,
                random_prob: float):
    """The BERT family's skeleton: whole-text chunks; `choose(tokens, seeds)` picks the noise tokens and, per token,
    the draw that BERT's 80/10/10 rule reads; the target is the original chunk."""
    ds = chunks(dataset, output_features, chunk_length(name, sequence_length))
    vocabulary = _vocabulary(output_features)

    @seqio.map_over_dataset(num_seeds=num_seeds + 1)
    def corrupt(features, seeds):
        tokens = features["targets"]
        noise, choice = choose(tokens, seeds[:num_seeds])
        inputs = bert_corrupt(tokens, noise, choice, vocabulary, seeds[num_seeds], mask_prob, random_prob)
        return {"inputs": inputs, "targets": tokens}

    return corrupt(ds)


@gin.configurable(module="objectives", denylist=["dataset", "sequence_length", "output_features"])
def bert_mlm(dataset, sequence_length, output_features, noise_density: float = 0.15, mask_prob: float = 0.8,
             random_prob: float = 0.1):
    """BERT's masked LM in text-to-text form: `noise_density` of the tokens chosen; of those 80% become the mask
    sentinel, 10% a random piece, 10% stay. The target is the original chunk."""
    _check("bert_mlm", noise_density=noise_density, mask_prob=mask_prob, random_prob=random_prob)

    def choose(tokens, seeds):
        noise = exact_noise_mask(tf.size(tokens), noise_density, seeds[0])
        return noise, tf.random.stateless_uniform(tf.shape(tokens), seed=seeds[1])

    return _bert_style("bert_mlm", dataset, sequence_length, output_features, choose, 2, mask_prob, random_prob)


@gin.configurable(module="objectives", denylist=["dataset", "sequence_length", "output_features"])
def bert_mlm_wwm(dataset, sequence_length, output_features, noise_density: float = 0.15, mask_prob: float = 0.8,
                 random_prob: float = 0.1):
    """BERT with whole-word masking: words (a piece with SentencePiece's word-start marker and the pieces after it)
    are chosen in random order until `noise_density` of the tokens are; each chosen token then follows 80/10/10."""
    _check("bert_mlm_wwm", noise_density=noise_density, mask_prob=mask_prob, random_prob=random_prob)
    word_start = piece_table(_vocabulary(output_features), "word_start")

    def choose(tokens, seeds):
        words = word_ids(tokens, word_start)
        word_lengths = tf.math.bincount(words)
        order = tf.random.experimental.stateless_shuffle(tf.range(tf.size(word_lengths)), seed=seeds[0])
        chosen = units_within_budget(word_lengths, order, tf.cast(tf.size(tokens), tf.float32) * noise_density)
        return tf.gather(chosen, words), tf.random.stateless_uniform(tf.shape(tokens), seed=seeds[1])

    return _bert_style("bert_mlm_wwm", dataset, sequence_length, output_features, choose, 2, mask_prob, random_prob)


def units_within_budget(unit_lengths: tf.Tensor, order: tf.Tensor, budget: tf.Tensor) -> tf.Tensor:
    """Per unit (a word, an entity, a phrase), whether it is chosen: units in `order` until `budget` tokens, a unit
    chosen when the budget is reached by its middle, so that the token share is the budget's on average (BERT stops
    one word short of the budget, which biases it down by half a word per sequence)."""
    in_order = tf.gather(unit_lengths, order)
    middles = tf.cast(tf.cumsum(in_order), tf.float32) - tf.cast(in_order, tf.float32) / 2
    return tf.scatter_nd(order[:, None], middles <= budget, tf.shape(unit_lengths))


def truncated_geometric_lengths(count: tf.Tensor, p: float, max_length: int, seed: tf.Tensor) -> tf.Tensor:
    """Span lengths 1..max_length with probabilities proportional to p (1 - p)^(l - 1), as SpanBERT samples them
    (mean 3.8 words at p = 0.2, max 10)."""
    logits = tf.math.log(p) + tf.range(max_length, dtype=tf.float32) * tf.math.log(1.0 - p)
    draws = tf.random.stateless_categorical(logits[None, :], count, seed=seed, dtype=tf.int32)[0]
    return draws + 1


@gin.configurable(module="objectives", denylist=["dataset", "sequence_length", "output_features"])
def spanbert(dataset, sequence_length, output_features, noise_density: float = 0.15, geometric_p: float = 0.2,
             max_span_words: int = 10, mask_prob: float = 0.8, random_prob: float = 0.1):
    """SpanBERT's span masking: spans of whole words, their lengths in words from a geometric distribution
    (p = `geometric_p`, clipped at `max_span_words`), until `noise_density` of the words are covered; the 80/10/10
    rule is applied per span (every token of a span masked, or every token random, or all kept). The target is
    the original chunk. A chunk of fewer than MIN_NOISED words stays clean."""
    _check("spanbert", noise_density=noise_density,
           geometric_p=geometric_p, max_span_words=max_span_words, mask_prob=mask_prob, random_prob=random_prob)
    word_start = piece_table(_vocabulary(output_features), "word_start")

    def choose(tokens, seeds):
        words = word_ids(tokens, word_start)
        num_words = words[-1] + 1
        clean = (tf.zeros_like(tokens, dtype=tf.bool), tf.ones(tf.shape(tokens)))
        return tf.cond(num_words >= MIN_NOISED, lambda: spans_of(words, num_words, seeds), lambda: clean)

    def spans_of(words, num_words, seeds):
        budget = tf.minimum(num_noise(num_words, noise_density), num_words - 2)  # two clean words around a span
        lengths = truncated_geometric_lengths(num_words, geometric_p, max_span_words, seeds[0])
        spans = budgeted_spans(tf.minimum(lengths, budget), budget, max_spans=num_words - budget - 1)
        noisy_word, span_of_word, _ = place_spans(num_words, spans, seeds[1])
        span_choice = tf.random.stateless_uniform([tf.size(spans) + 1], seed=seeds[2])
        return tf.gather(noisy_word, words), tf.gather(span_choice, tf.gather(span_of_word, words))

    return _bert_style("spanbert", dataset, sequence_length, output_features, choose, 3, mask_prob, random_prob)


# --- BART's noising ---------------------------------------------------------------------------------------------


@gin.configurable(module="objectives", denylist=["dataset", "sequence_length", "output_features"])
def bart_infilling(dataset, sequence_length, output_features, noise_density: float = 0.3,
                   poisson_lambda: float = 3.0):
    """BART's text infilling: span lengths from Poisson(`poisson_lambda`), spans sampled until `noise_density` of
    the tokens are covered; each span, zero-length ones included (an insertion), becomes one mask sentinel."""
    _check("bart_infilling", noise_density=noise_density, poisson_lambda=poisson_lambda)
    ds = chunks(dataset, output_features, chunk_length("bart_infilling", sequence_length))
    mask_id = t5p.sentinel_id(_vocabulary(output_features))

    @seqio.map_over_dataset(num_seeds=2)
    def corrupt(features, seeds):
        tokens = features["targets"]
        n = tf.size(tokens)
        return {"inputs": tf.cond(n >= MIN_NOISED, lambda: infill(tokens, n, seeds), lambda: tokens),
                "targets": tokens}

    def infill(tokens, n, seeds):
        budget = tf.minimum(num_noise(n, noise_density), n - 2)  # two clean tokens around a span
        lengths = tf.random.stateless_poisson([n], seeds[0], lam=poisson_lambda, dtype=tf.int32)
        spans = budgeted_spans(lengths, budget, max_spans=n - budget - 1)
        noise, _, starts = place_spans(n, spans, seeds[1])
        # Each span leaves one mask before the first token after its start; tokens of spans are dropped.
        mask_before = tf.scatter_nd(starts[:, None], tf.ones_like(starts), [n + 1])[:n] > 0
        pieces = tf.stack([tf.fill([n], tf.cast(mask_id, tokens.dtype)), tokens], axis=1)
        keep = tf.stack([mask_before, tf.logical_not(noise)], axis=1)
        return tf.boolean_mask(pieces, keep)

    return corrupt(ds)


@gin.configurable(module="objectives", denylist=["dataset", "sequence_length", "output_features"])
def bart_token_masking(dataset, sequence_length, output_features, noise_density: float = 0.3):
    """BART's token masking: `noise_density` of the tokens replaced by the mask sentinel; the target is the chunk."""
    _check("bart_token_masking", noise_density=noise_density)
    ds = chunks(dataset, output_features, chunk_length("bart_token_masking", sequence_length))
    return _iid_denoise(ds, output_features, noise_density, t5p.noise_token_to_sentinel, None)


@gin.configurable(module="objectives", denylist=["dataset", "sequence_length", "output_features"])
def bart_token_deletion(dataset, sequence_length, output_features, noise_density: float = 0.3):
    """BART's token deletion: `noise_density` of the tokens removed (the model must find where); the target is
    the chunk."""
    _check("bart_token_deletion", noise_density=noise_density)
    ds = chunks(dataset, output_features, chunk_length("bart_token_deletion", sequence_length))
    return _iid_denoise(ds, output_features, noise_density, t5p.drop_noise_tokens, None)


def bart_sentence_permutation(dataset, sequence_length, output_features):
    """BART's sentence permutation: a document's sentences (ended by a piece ending in . ! or ?) in random order.
    A document is one line of the corpus, cut to the lengths where longer (its first and last sentences may then
    be partial)."""
    n = chunk_length("bart_sentence_permutation", sequence_length)
    ds = chunks(dataset, output_features, n, concatenate=False)
    vocabulary = _vocabulary(output_features)

    @seqio.map_over_dataset(num_seeds=1)
    def permute(features, seed):
        tokens = features["targets"]
        ends = tf.cast(tf.gather(piece_table(vocabulary, "sentence_end"), tokens), tf.int32)
        sentence = tf.cumsum(ends, exclusive=True)
        rank = tf.argsort(tf.random.experimental.stateless_shuffle(tf.range(sentence[-1] + 1), seed=seed))
        order = tf.argsort(tf.gather(rank, sentence) * tf.size(tokens) + tf.range(tf.size(tokens)))
        return {"inputs": tf.gather(tokens, order), "targets": tokens}

    return permute(ds)


def bart_document_rotation(dataset, sequence_length, output_features):
    """BART's document rotation: a token chosen uniformly starts the document, the tokens before it moved to its
    end. A document is one line of the corpus (cut to the lengths where longer)."""
    ds = chunks(dataset, output_features, chunk_length("bart_document_rotation", sequence_length),
                concatenate=False)

    @seqio.map_over_dataset(num_seeds=1)
    def rotate(features, seed):
        tokens = features["targets"]
        start = tf.random.stateless_uniform([], seed=seed, maxval=tf.size(tokens), dtype=tf.int32)
        return {"inputs": tf.roll(tokens, -start, axis=0), "targets": tokens}

    return rotate(ds)


# --- next-sentence prediction -----------------------------------------------------------------------------------

SENTENCE_BREAK = r"""([.!?]["')]?)\s+(["'(]?[A-Z])"""
# Full stops that end no sentence: titles and initials ("Mr. Elton", "H. americanus"), hidden while splitting.
ABBREVIATION = r"\b(Mr|Mrs|Ms|Dr|St|Mt|Jr|Sr|Prof|Gen|Col|Capt|Lt|Rev|Hon|Gov|Sen|Rep|No|vs|[A-Z])\."
NSP_LABELS = ("next", "not_next")
SOP_LABELS = ("in_order", "swapped")
NSP_NEGATIVE_BLOCK = 4096  # sentences; negatives are drawn from a shuffled block this far ahead in the stream


def split_sentences(text: tf.Tensor) -> tf.Tensor:
    """A document's sentences: it breaks after . ! or ? (and a closing quote or bracket) followed by white space
    and a capital letter (or an opening quote or bracket and one), except after a title or an initial."""
    hidden = tf.strings.regex_replace(text, ABBREVIATION, "\\1\x1f")
    marked = tf.strings.regex_replace(hidden, SENTENCE_BREAK, "\\1\x1e\\2")
    return tf.strings.regex_replace(tf.strings.split(marked, "\x1e"), "\x1f", ".")


def _documents(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Each corpus line's sentences, and a hash that names its document."""
    return dataset.map(lambda ex: {"sentences": split_sentences(ex["text"]),
                                   "doc": tf.strings.to_hash_bucket_fast(ex["text"], 2**62)})


def _consecutive_sentences(documents: tf.data.Dataset) -> tf.data.Dataset:
    """Every pair of consecutive sentences of a document, in order, with the document's hash."""
    return documents.flat_map(lambda d: tf.data.Dataset.from_tensor_slices(
        {"first": d["sentences"][:-1], "second": d["sentences"][1:],
         "doc": tf.fill([tf.maximum(tf.size(d["sentences"]) - 1, 0)], d["doc"])}))


@gin.configurable(module="objectives", denylist=["dataset", "sequence_length", "output_features"])
def nsp(dataset, sequence_length=None, output_features=None, negative_block: int = NSP_NEGATIVE_BLOCK):
    """BERT's next-sentence prediction as text to text: for each pair of consecutive sentences of a document,
    with probability 1/2 the second is kept (target "next"), else replaced by a sentence of another document
    (target "not_next"). A document is one line of the corpus. Inputs: "nsp sentence1: ... sentence2: ...".

    The other document's sentence comes from the stream of all sentences, shuffled in blocks of
    `negative_block` and read half a block ahead, so it is far from the current document (and never from it)."""
    _check("nsp", negative_block=negative_block)
    del sequence_length, output_features  # targets are one word; inputs longer than the length are cut as GLUE's
    documents = _documents(dataset)
    pairs = _consecutive_sentences(documents)
    sentences = documents.flat_map(lambda d: tf.data.Dataset.from_tensor_slices(
        {"sentence": d["sentences"], "doc": tf.fill(tf.shape(d["sentences"]), d["doc"])}))

    @seqio.map_over_dataset(num_seeds=1)
    def shuffle_block(block, seed):
        order = tf.random.experimental.stateless_shuffle(tf.range(tf.size(block["doc"])), seed=seed)
        return {k: tf.gather(v, order) for k, v in block.items()}

    negatives = shuffle_block(sentences.repeat().skip(negative_block // 2).batch(negative_block)).unbatch()
    both = tf.data.Dataset.zip(pairs, negatives).filter(lambda pair, other: pair["doc"] != other["doc"])
    both = both.map(lambda pair, other: {"first": pair["first"], "second": pair["second"], "other": other["sentence"]})

    @seqio.map_over_dataset(num_seeds=1)
    def label(pair, seed):
        is_next = tf.random.stateless_uniform([], seed=seed) < 0.5
        second = tf.where(is_next, pair["second"], pair["other"])
        inputs = tf.strings.join(["nsp sentence1: ", pair["first"], " sentence2: ", second])
        return {"inputs": inputs, "targets": tf.where(is_next, NSP_LABELS[0], NSP_LABELS[1])}

    return label(both)


def albert_sop(dataset, sequence_length=None, output_features=None):
    """ALBERT's sentence-order prediction as text to text: two consecutive sentences of one document, in their
    order (target "in_order") or, with probability 1/2, swapped ("swapped"). Inputs: "sop sentence1: ...
    sentence2: ...". Unlike NSP's negatives, both halves always come from the same document, so topic gives no
    clue: only coherence does (ALBERT's argument for replacing NSP)."""
    del sequence_length, output_features  # targets are one word; inputs longer than the length are cut as GLUE's

    @seqio.map_over_dataset(num_seeds=1)
    def label(pair, seed):
        swapped = tf.random.stateless_uniform([], seed=seed) < 0.5
        first = tf.where(swapped, pair["second"], pair["first"])
        second = tf.where(swapped, pair["first"], pair["second"])
        inputs = tf.strings.join(["sop sentence1: ", first, " sentence2: ", second])
        return {"inputs": inputs, "targets": tf.where(swapped, SOP_LABELS[1], SOP_LABELS[0])}

    return label(_consecutive_sentences(_documents(dataset)))


# --- ELECTRA, GPT ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _unigram_cdf(model_file: str, low: int, high: int) -> np.ndarray:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    special = (sp.is_unknown, sp.is_control, sp.is_unused)
    scores = np.array([-np.inf if any(is_(i) for is_ in special) else sp.get_score(i)
                       for i in range(low, min(high, sp.get_piece_size()))])
    probs = np.exp(scores - scores.max())
    return np.cumsum(probs / probs.sum())


def unigram_cdf(vocabulary: seqio.Vocabulary) -> tf.Tensor:
    """The cumulative unigram distribution of the ordinary pieces (ids from `first_random_id`): SentencePiece's
    unigram model stores each piece's log-probability, estimated by EM over the text it was trained on."""
    low, high = first_random_id(vocabulary)
    return tf.constant(_unigram_cdf(vocabulary.sentencepiece_model_file, low, high), tf.float32)


@gin.configurable(module="objectives", denylist=["dataset", "sequence_length", "output_features"])
def electra_replaced_tokens(dataset, sequence_length, output_features, noise_density: float = 0.15):
    """ELECTRA's replaced-token detection as text to text: `noise_density` of the tokens are drawn and each is
    replaced by a piece sampled from the vocabulary's unigram distribution (`unigram_cdf`); the target lists the
    replaced tokens as they stand in the inputs, in order, so the model must say which tokens are fake. A draw
    equal to the original is not a replacement (ELECTRA labels it original too).

    Why unigram samples and not ELECTRA's small generator: a generator is a second model trained jointly, which a
    text-to-text task (data only) cannot hold; unigram replacements are ELECTRA's own ablation baseline, and they
    keep the objective a data preprocessor like the others. Its replacements are easier to spot than a trained
    generator's."""
    _check("electra_replaced_tokens", noise_density=noise_density)
    n = chunk_length("electra_replaced_tokens", sequence_length,
                     targets_needed=lambda n: _noise_count(n, noise_density) + 1)
    ds = chunks(dataset, output_features, n)
    vocabulary = _vocabulary(output_features)
    cdf, low = unigram_cdf(vocabulary), first_random_id(vocabulary)[0]

    @seqio.map_over_dataset(num_seeds=2)
    def replace(features, seeds):
        tokens = features["targets"]
        noise = exact_noise_mask(tf.size(tokens), noise_density, seeds[0])
        draws = tf.random.stateless_uniform(tf.shape(tokens), seed=seeds[1])
        samples = tf.cast(tf.minimum(tf.searchsorted(cdf, draws, side="right"), tf.size(cdf) - 1) + low,
                          tokens.dtype)
        replaced = noise & tf.not_equal(samples, tokens)
        inputs = tf.where(replaced, samples, tokens)
        return {"inputs": inputs, "targets": tf.boolean_mask(inputs, replaced)}

    return replace(ds)


@gin.configurable(module="objectives", denylist=["dataset", "sequence_length", "output_features"])
def causal_lm(dataset, sequence_length, output_features, prefix: str = ""):
    """GPT's left-to-right language modelling: the whole chunk is the target, decoded from nothing but `prefix`
    (empty by default: the encoder sees only EOS, so the decoder alone models the text). Chunks are sized by the
    targets length alone."""
    lengths = {**NO_LENGTHS, **(sequence_length or {})}
    prompt = _vocabulary(output_features).encode(prefix) if prefix else []
    if len(prompt) + 1 > lengths["inputs"]:
        raise ValueError(f"objectives.causal_lm.prefix is {len(prompt)} tokens; TASK_FEATURE_LENGTHS inputs "
                         f"{lengths['inputs']} holds at most {lengths['inputs'] - 1} (and EOS)")
    n = chunk_length("causal_lm", {"inputs": lengths["targets"], "targets": lengths["targets"]})
    ds = chunks(dataset, output_features, n)
    inputs = tf.constant(prompt, tf.int32)
    return ds.map(lambda features: {"inputs": tf.cast(inputs, features["targets"].dtype),
                                    "targets": features["targets"]}, num_parallel_calls=tf.data.AUTOTUNE)


# --- ERNIE's knowledge masking -----------------------------------------------------------------------------------


def _knowledge_masking(name: str, units_of, dataset, sequence_length, output_features, noise_density: float,
                       mask_prob: float, random_prob: float):
    """ERNIE's skeleton over raw text: units (entities or phrases, see `tasks.knowledge_units`; every other word a
    unit of its own) are chosen, the special ones first, in random order within each kind, until `noise_density`
    of the chunk's tokens; BERT's 80/10/10 rule applies per unit. The target is the original chunk."""
    vocabulary = _vocabulary(output_features)
    n = chunk_length(name, sequence_length)

    def tokenized(features):
        words = tf.strings.split(features["text"])
        starts, special = units_of(words)
        pieces = vocabulary.encode_tf(words)
        per_word = pieces.row_lengths()
        first_piece = tf.equal(tf.ragged.range(per_word).flat_values, 0)
        return {"targets": pieces.flat_values,
                "unit_start": tf.cast(tf.repeat(starts, per_word) & first_piece, pieces.dtype),
                "special": tf.cast(tf.repeat(special, per_word), pieces.dtype)}

    keys = ["unit_start", "special"]
    ds = dataset.map(tokenized, num_parallel_calls=tf.data.AUTOTUNE)
    ds = t5p.select_random_chunk(ds, output_features=output_features, feature_key="targets", max_length=65536,
                                 additional_feature_keys=keys)
    ds = t5p.split_tokens(ds, feature_key="targets", min_tokens_per_segment=None, max_tokens_per_segment=n,
                          additional_feature_keys=keys)
    ds = ds.filter(lambda features: tf.size(features["targets"]) > 0)

    @seqio.map_over_dataset(num_seeds=3)
    def corrupt(features, seeds):
        tokens = features["targets"]
        unit = tf.cumsum(tf.concat([[1], features["unit_start"][1:]], axis=0)) - 1  # a chunk starts a unit
        lengths = tf.math.bincount(unit)
        special = tf.math.unsorted_segment_max(features["special"], unit, tf.size(lengths)) > 0
        key = tf.random.stateless_uniform(tf.shape(lengths), seed=seeds[0]) + tf.cast(~special, tf.float32)
        chosen = units_within_budget(lengths, tf.argsort(key), tf.cast(tf.size(tokens), tf.float32) * noise_density)
        choice = tf.gather(tf.random.stateless_uniform(tf.shape(lengths), seed=seeds[1]), unit)
        inputs = bert_corrupt(tokens, tf.gather(chosen, unit), choice, vocabulary, seeds[2], mask_prob, random_prob)
        return {"inputs": inputs, "targets": tokens}

    return corrupt(ds)


@gin.configurable(module="objectives", denylist=["dataset", "sequence_length", "output_features"])
def ernie_entity_masking(dataset, sequence_length, output_features, noise_density: float = 0.15,
                         mask_prob: float = 0.8, random_prob: float = 0.1, source: str | None = None):
    """ERNIE 1.0's entity-level masking: named-entity mentions (a gazetteer of `source`, by default CoNLL-2003's
    training entities) masked whole, before any other word, within `noise_density` of the tokens."""
    _check("ernie_entity_masking", noise_density=noise_density, mask_prob=mask_prob, random_prob=random_prob)
    units = knowledge_units.EntityUnits(knowledge_units.source_path("ernie_entity_masking", source))
    return _knowledge_masking("ernie_entity_masking", units, dataset, sequence_length, output_features,
                              noise_density, mask_prob, random_prob)


@gin.configurable(module="objectives", denylist=["dataset", "sequence_length", "output_features"])
def ernie_phrase_masking(dataset, sequence_length, output_features, noise_density: float = 0.15,
                         mask_prob: float = 0.8, random_prob: float = 0.1, source: str | None = None):
    """ERNIE 1.0's phrase-level masking: noun phrases of two words or more (a rule-based chunker over a
    part-of-speech lexicon of `source`, by default CoNLL-2003's training file) masked whole, before any other
    word, within `noise_density` of the tokens."""
    _check("ernie_phrase_masking", noise_density=noise_density, mask_prob=mask_prob, random_prob=random_prob)
    units = knowledge_units.PhraseUnits(knowledge_units.source_path("ernie_phrase_masking", source))
    return _knowledge_masking("ernie_phrase_masking", units, dataset, sequence_length, output_features,
                              noise_density, mask_prob, random_prob)


# --- the registry -----------------------------------------------------------------------------------------------

OBJECTIVES: dict[str, Callable] = {
    "span_corruption": span_corruption,
    "iid_denoising": iid_denoising,
    "drop_corrupted_tokens": drop_corrupted_tokens,
    "prefix_lm": prefix_lm,
    "deshuffling": deshuffling,
    "bert_mlm": bert_mlm,
    "bert_mlm_wwm": bert_mlm_wwm,
    "spanbert": spanbert,
    "bart_infilling": bart_infilling,
    "bart_token_masking": bart_token_masking,
    "bart_token_deletion": bart_token_deletion,
    "bart_sentence_permutation": bart_sentence_permutation,
    "bart_document_rotation": bart_document_rotation,
    "nsp": nsp,
    "albert_sop": albert_sop,
    "electra_replaced_tokens": electra_replaced_tokens,
    "causal_lm": causal_lm,
    "ernie_entity_masking": ernie_entity_masking,
    "ernie_phrase_masking": ernie_phrase_masking,
}
# These take the raw text and return text for seqio to tokenize, or (SELF_TOKENIZING) tokens; the others take
# tokenized text.
TEXT_OBJECTIVES = frozenset({"nsp", "albert_sop", "ernie_entity_masking", "ernie_phrase_masking"})
SELF_TOKENIZING = frozenset({"ernie_entity_masking", "ernie_phrase_masking"})  # units are found in words

