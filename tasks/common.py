"""What every built-in task shares: the configured vocabulary, the text-to-text output features, and the
preprocessing tail with seqio's cache point."""

from __future__ import annotations

import seqio

from mtplatform.vocab import ConfiguredVocabulary

VOCABULARY = ConfiguredVocabulary()

OUTPUT_FEATURES = {
    "inputs": seqio.Feature(vocabulary=VOCABULARY, add_eos=True, required=False),
    "targets": seqio.Feature(vocabulary=VOCABULARY, add_eos=True),
}


def tokenized_and_cached(*text_steps) -> list:
    """A task's preprocessors: its text steps, tokenization, seqio's cache point, EOS (trimmed to the run's length).

    Everything before the cache point is deterministic and independent of the run's lengths, so `mtp cache` can
    store its output once (`mtplatform.cache`); a run's lengths, and any random choice, apply after it.
    """
    return [*text_steps, seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
            seqio.preprocessors.append_eos_after_trim]
