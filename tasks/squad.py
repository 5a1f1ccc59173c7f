"""SQuAD v1.1 as `question: ... context: ...` -> first gold answer, scored by EM and F1 over all gold answers.

Unlike `t5.data.preprocessors.squad` we do not pad punctuation with spaces: the official script compares predictions
with the gold answers as written, and a model trained on padded targets ("U . S .") would lose exact matches that
the official normalization cannot restore. Metrics are `t5.evaluation.metrics.squad`, which applies the official
normalization (lower case, no punctuation, no articles, single spaces) and takes the best score over gold answers.

Two tasks:
- `squad_v1`: the official files, `squad/train-v1.1.json` and `squad/dev-v1.1.json`.
- `squad_v1_devsplit`: for machines that have only the dev file. Its articles are split with
  `sources.in_squad_dev_train_split` (crc32 of the title, about 80% train); train and validation share no article.
"""

from __future__ import annotations

from pathlib import Path

import seqio
import tensorflow as tf
from t5.data import postprocessors
from t5.evaluation import metrics

from tasks.common import OUTPUT_FEATURES, tokenized_and_cached
from tasks.sources import FileSource, Row, in_squad_dev_train_split, read_squad


@seqio.map_over_dataset
def squad_text_to_text(x: dict) -> dict:
    """`question: <q> context: <c>` -> first answer; keeps all answers for the metric."""
    return {
        "inputs": tf.strings.join(["question:", x["question"], "context:", x["context"]], separator=" "),
        "targets": x["answers"][0],
        "id": x["id"],
        "answers": x["answers"],
    }


def _register(name: str, source: FileSource) -> None:
    seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=tokenized_and_cached(squad_text_to_text),
        postprocess_fn=postprocessors.qa,  # targets -> all gold answers of the example
        metric_fns=[metrics.squad],
        output_features=OUTPUT_FEATURES,
    )


_register(
    "squad_v1",
    FileSource(
        "squad_v1",
        {"train": "squad/train-v1.1.json", "validation": "squad/dev-v1.1.json"},
        reader=lambda path, split: read_squad(path),
        num_input_examples={"train": 87599, "validation": 10570},
    ),
)


def _read_devsplit(path: Path, split: str) -> list[Row]:
    keep = in_squad_dev_train_split if split == "train" else lambda title: not in_squad_dev_train_split(title)
    return read_squad(path, keep_article=keep)


_register(
    "squad_v1_devsplit",
    FileSource(
        "squad_v1_devsplit",
        {"train": "squad/dev-v1.1.json", "validation": "squad/dev-v1.1.json"},
        reader=_read_devsplit,
        num_input_examples={"train": 9189, "validation": 1381},  # 40 and 8 of the 48 dev articles
    ),
)
