"""What every built-in task shares: the configured vocabulary and the text-to-text output features."""

from __future__ import annotations

import seqio

from mtplatform.vocab import ConfiguredVocabulary

VOCABULARY = ConfiguredVocabulary()

OUTPUT_FEATURES = {
    "inputs": seqio.Feature(vocabulary=VOCABULARY, add_eos=True, required=False),
    "targets": seqio.Feature(vocabulary=VOCABULARY, add_eos=True),
}
