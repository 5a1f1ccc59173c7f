"""The units ERNIE 1.0's knowledge masking masks whole: named entities and phrases, found in plain text.

ERNIE (Sun et al. 2019) masks whole entities and whole phrases, found by a lexical analyser. No such analyser with
a model from its official source installs here: spaCy's, Stanza's, Flair's and NLTK's models are downloaded from
GitHub or the Hugging Face hub at first use, which this platform cannot reach, and a re-uploaded model of unknown
origin is not an option. So the units come from the one annotated corpus we ship, CoNLL-2003's training file
(`conll2003/eng.train` under the data directory; any file in its format can be named instead):
- entities: a gazetteer of every entity mention in it (PER, ORG, LOC, MISC; 8,000-odd distinct strings; a one-word
  string only where it is tagged an entity more often than not), matched case-sensitively on whole words;
  overlapping matches form one unit;
- phrases: a rule-based noun-phrase chunker, the classic regular-expression one (the NLTK book's `DT? JJ* NN+`),
  over part-of-speech tags from a lexicon of the same file (each word's most frequent tag; unknown words by
  capitalisation and suffix, else noun, as NLTK's default tagger does). Only chunks of two words or more are
  phrases; a word with punctuation after it ends its chunk.
Against CoNLL-2003's development file (testa, not used to build them): entity mentions precision 0.90, recall 0.68;
noun phrases of two words or more precision 0.75, recall 0.70 (`tests/test_objectives.py`).

Words are the corpus line's white-space-separated strings, compared without the punctuation at their ends. All of
it runs in TensorFlow (a lookup table and a regular expression over one letter per word), so it sits inside the
tf.data pipeline, checkpointable and deterministic like the other objectives.
"""

from __future__ import annotations

import collections
import functools
from pathlib import Path

import numpy as np
import tensorflow as tf

from mtplatform import settings
from tasks.sources import read_conll

DEFAULT_SOURCE = "conll2003/eng.train"  # under the data directory
MAX_ENTITY_WORDS = 8  # longer mentions (a handful in CoNLL-2003) are left out of the gazetteer
EDGE_PUNCTUATION = r"^[^\pL\pN]+|[^\pL\pN]+$"  # stripped from a word before it is compared
ENDS_IN_PUNCTUATION = r".*[\pL\pN][^\pL\pN]+"  # "Paris," ends its chunk

# Part-of-speech classes of the chunker: Determiner, adJective, Noun, Other; `n`: a noun that ends its chunk.
_DETERMINERS = {"DT", "PDT", "PRP$", "WP$"}
_ADJECTIVES = {"JJ", "JJR", "JJS"}
_NOUNS = {"NN", "NNS", "NNP", "NNPS", "CD"}
NOUN_PHRASE = r"(D?J*N*n|D?J*N+)"  # over one class letter per word; leftmost-first, greedy
# Unknown words: numbers and capitalised words are nouns, some suffixes mark verbs, adverbs or adjectives; else noun.
_SUFFIX_RULES = ((r"[\pN][\pN.,:/-]*", "N"), (r"\p{Lu}.*", "N"), (r".*(ing|ed|ly)", "O"),
                 (r".*(ous|ful|ive|able|ible|ic|less)", "J"))


class UnitSourceError(ValueError):
    """The file the units come from is missing or unreadable; the message names it and the objective."""


def source_path(objective: str, source: str | None) -> Path:
    """The CoNLL-format file the units come from: `source` (relative to the data directory, or absolute), by default
    CoNLL-2003's training file; or a one-line error naming the objective's setting."""
    path = Path(source or DEFAULT_SOURCE).expanduser()
    path = path if path.is_absolute() else settings.data_dir() / path
    if not path.is_file():
        raise UnitSourceError(f"objective {objective}: {path} (objectives.{objective}.source) does not exist; it "
                              "needs a file in CoNLL-2003's format (token POS chunk NER per line)")
    return path


def _normalized(words) -> np.ndarray:
    return tf.strings.regex_replace(tf.constant(list(words), tf.string), EDGE_PUNCTUATION, "").numpy()


@functools.lru_cache(maxsize=4)
def gazetteer(path: Path) -> tuple[tuple[bytes, ...], int]:
    """The distinct entity mentions of a CoNLL file (words normalised, joined by spaces), and the longest's words."""
    from tasks.conll import tags_to_spans  # tasks.conll registers tasks; imported when a gazetteer is first needed

    mentions: set[bytes] = set()
    as_entity: collections.Counter = collections.Counter()  # one-word strings: how often tagged an entity, and not
    as_other: collections.Counter = collections.Counter()
    for row in read_conll(path):
        words = _normalized(row["tokens"])
        for _, first, last in tags_to_spans(row["tags"]):
            if last - first < MAX_ENTITY_WORDS and all(words[first:last + 1]):
                mentions.add(b" ".join(words[first:last + 1]))
        for word, tag in zip(words, row["tags"], strict=True):
            (as_other if tag == "O" else as_entity)[word] += 1
    # A one-word mention that is more often not an entity ("The" in a title, "May") would mask common words.
    mentions = {m for m in mentions if b" " in m or as_entity[m] > as_other[m]}
    return tuple(sorted(mentions)), max((m.count(b" ") + 1 for m in mentions), default=1)


@functools.lru_cache(maxsize=4)
def lexicon(path: Path) -> tuple[dict[bytes, str], dict[bytes, str]]:
    """Each word's chunker class by its most frequent tag in a CoNLL file: as written, and lower-cased."""
    exact: dict[bytes, collections.Counter] = collections.defaultdict(collections.Counter)
    lower: dict[bytes, collections.Counter] = collections.defaultdict(collections.Counter)
    for row in read_conll(path, with_syntax=True):
        for word, tag in zip(_normalized(row["tokens"]), row["pos"], strict=True):
            if word:
                exact[word][_class_of(tag)] += 1
                lower[word.lower()][_class_of(tag)] += 1
    return ({w: c.most_common(1)[0][0] for w, c in exact.items()},
            {w: c.most_common(1)[0][0] for w, c in lower.items()})


def _class_of(tag: str) -> str:
    return "D" if tag in _DETERMINERS else "J" if tag in _ADJECTIVES else "N" if tag in _NOUNS else "O"


def _table(mapping: dict[bytes, str]) -> tf.lookup.StaticHashTable:
    keys = list(mapping) or [b"\x00"]
    values = list(mapping.values()) or [""]
    return tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(keys, values), default_value="")


class EntityUnits:
    """Per word of a text: whether it starts a unit, and whether it is part of an entity mention."""

    def __init__(self, path: Path):
        mentions, self.longest = gazetteer(path)
        self.table = _table(dict.fromkeys(mentions, "E"))

    def __call__(self, words: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        normal = tf.strings.regex_replace(words, EDGE_PUNCTUATION, "")
        num_words = tf.size(words)
        linked = tf.zeros([num_words], tf.bool)  # word i is in one mention with word i - 1
        covered = tf.zeros([num_words], tf.bool)
        for n in range(1, self.longest + 1):
            grams = tf.strings.ngrams(normal, n, separator=" ") if n > 1 else normal
            match = tf.equal(self.table.lookup(grams), "E")
            match = tf.concat([match, tf.zeros([num_words - tf.size(match)], tf.bool)], axis=0)  # by start word
            for k in range(n):  # a mention starting at i - k covers word i, and links it to i - 1 where k >= 1
                head = tf.zeros([tf.minimum(k, num_words)], tf.bool)
                shifted = tf.concat([head, match[:tf.maximum(num_words - k, 0)]], axis=0)
                covered |= shifted
                if k:
                    linked |= shifted
        return tf.logical_not(linked), covered


class PhraseUnits:
    """Per word of a text: whether it starts a unit, and whether it is part of a phrase of two words or more."""

    def __init__(self, path: Path):
        exact, lower = lexicon(path)
        self.exact, self.lower = _table(exact), _table(lower)

    def classes(self, words: tf.Tensor) -> tf.Tensor:
        """One class letter per word (D, J, N, O; n for a noun with punctuation after it)."""
        normal = tf.strings.regex_replace(words, EDGE_PUNCTUATION, "")
        guess = tf.fill(tf.shape(normal), "N")
        for pattern, letter in reversed(_SUFFIX_RULES):  # the first rule that matches wins
            guess = tf.where(tf.strings.regex_full_match(normal, pattern), letter, guess)
        known = self.exact.lookup(normal)
        known = tf.where(known == "", self.lower.lookup(tf.strings.lower(normal)), known)
        letters = tf.where(known == "", guess, known)
        letters = tf.where(normal == "", "O", letters)
        ends = tf.strings.regex_full_match(words, ENDS_IN_PUNCTUATION)
        return tf.where(ends, tf.where(letters == "N", "n", "O"), letters)

    def __call__(self, words: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        marked = tf.strings.regex_replace(tf.strings.reduce_join(self.classes(words)), NOUN_PHRASE, r"[\1]")
        chars = tf.strings.bytes_split(marked)
        is_open, is_close = tf.equal(chars, "["), tf.equal(chars, "]")
        depth = tf.cumsum(tf.cast(is_open, tf.int32) - tf.cast(is_close, tf.int32))
        is_word = tf.logical_not(is_open | is_close)
        after_open = tf.concat([[False], is_open], axis=0)[:-1]
        starts = tf.boolean_mask(after_open | (depth == 0), is_word)
        inside = tf.boolean_mask(depth > 0, is_word)
        unit = tf.cumsum(tf.cast(starts, tf.int32)) - 1
        long_unit = tf.gather(tf.math.bincount(unit, minlength=1) >= 2, unit)
        return starts, inside & long_unit
