"""The pretraining objectives of `tasks.objectives` registered over plain text: the shipped corpus, or any files.

The corpus is every `text/**/*.txt` under the data directory, streamed by `tasks.sources.TextSource` (which says
what a document is; about 1% of them, by a hash of the text, form the validation split). `register_text_tasks`
registers the same objectives over any files a user names, as `<prefix>_<objective>`.

Registry names: T5's `span_corruption`, `iid_denoising` ("replace corrupted spans"), `drop_corrupted_tokens`,
`prefix_lm`, `deshuffling`; BERT's `bert_mlm`, `bert_mlm_wwm`, `nsp`; SpanBERT's `spanbert`; BART's
`bart_infilling`, `bart_token_masking`, `bart_token_deletion`, `bart_sentence_permutation`,
`bart_document_rotation`; ALBERT's `albert_sop`; ELECTRA's `electra_replaced_tokens`; GPT's `causal_lm`; ERNIE's
`ernie_entity_masking` and `ernie_phrase_masking` (their units: `tasks.knowledge_units`). Their parameters are gin
settings of `objectives.<name>` (see `tasks.objectives`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import seqio

from mtplatform import catalog, mixing
from tasks import objectives
from tasks.common import OUTPUT_FEATURES
from tasks.sources import TextSource

LABELS = {"nsp": objectives.NSP_LABELS, "albert_sop": objectives.SOP_LABELS}  # classification objectives
_TOKENIZED = [
    functools.partial(seqio.preprocessors.rekey, key_map={"inputs": None, "targets": "text"}),
    seqio.preprocessors.tokenize,
]


def objective_preprocessors(objective: str) -> list:
    """The preprocessors of one objective's task: text to tokens, seqio's cache point, the objective, EOS.

    The objective comes after the cache point: a cached corpus (`mtp cache`) stores tokenized documents, and each
    run still draws fresh noise at its own lengths.
    """
    step = objectives.OBJECTIVES[objective]
    if objective in objectives.SELF_TOKENIZING:  # it finds its units in the words, then tokenizes them
        return [seqio.CacheDatasetPlaceholder(), step, seqio.preprocessors.append_eos_after_trim]
    if objective in objectives.TEXT_OBJECTIVES:  # it builds its own text inputs and targets, then they are tokenized
        return [seqio.CacheDatasetPlaceholder(), step, seqio.preprocessors.tokenize,
                seqio.preprocessors.append_eos_after_trim]
    return [*_TOKENIZED, seqio.CacheDatasetPlaceholder(), step, seqio.preprocessors.append_eos_after_trim]


def register_text_tasks(prefix: str, patterns: Sequence[str]) -> list[str]:
    """Register every objective over the text files matching `patterns` as `<prefix>_<objective>`; return names."""
    names = []
    # One source for all objectives: its lines are read (and counted, for rate functions) once, not per objective.
    source = TextSource(f"{prefix or 'unsupervised'} text tasks ({', '.join(patterns)})", patterns)
    for objective in objectives.OBJECTIVES:
        name = f"{prefix}_{objective}" if prefix else objective
        seqio.TaskRegistry.add(
            name,
            source=source,
            preprocessors=objective_preprocessors(objective),
            output_features=OUTPUT_FEATURES,
            metric_fns=[],
        )
        if objective in LABELS:
            catalog.register_labels(name, LABELS[objective])
        mixing.UNSUPERVISED_TASKS.add(name)  # its size is arbitrary: mixing rates use an artificial one
        names.append(name)
    return names


UNSUPERVISED_TASKS = tuple(register_text_tasks("", ["text/**/*.txt"]))
