"""GLUE as text-to-text tasks, formatted exactly as the `t5` package formats them.

Rows are read from the official GLUE TSV files into the TFDS GLUE feature layout (`idx`, `label`, the named text
features), then `t5.data.glue_utils` supplies the text preprocessor (benchmark prefix, features sorted by name,
label names as targets, STS-B rounded to 0.2), the postprocessor and the metrics (CoLA Matthews correlation; MRPC
and QQP F1 and accuracy; STS-B Pearson and Spearman; the rest accuracy; all in percent, as GLUE reports them).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import seqio
import tensorflow_datasets as tfds
from t5.data import glue_utils
from t5.evaluation import metrics as t5_metrics

from mtplatform import catalog, stats
from tasks.common import OUTPUT_FEATURES, tokenized_and_cached
from tasks.sources import DataFormatError, FileSource, Row, read_tsv

_CONFIGS = tfds.text.glue.Glue.builder_configs


@dataclass(frozen=True)
class GlueSpec:
    """Where one GLUE task's files are and which of their columns feed which TFDS feature."""

    config: str  # the TFDS builder config name, which t5.data.glue_utils keys on
    directory: str  # under <data_dir>/glue/
    text: dict[str, str]  # TFDS text feature -> TSV column name
    label: str | None  # TSV column with the label
    splits: dict[str, str]  # split -> file name
    sizes: dict[str, int]  # official example counts
    columns: tuple[str, ...] | None = None  # names of the columns of headerless labelled files (CoLA)
    test_splits: tuple[str, ...] = field(default=("test",))


_STD = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}

SPECS: dict[str, GlueSpec] = {
    "cola": GlueSpec(
        "cola", "CoLA", {"sentence": "sentence"}, "label", _STD, {"train": 8551, "validation": 1043, "test": 1063},
        columns=("source", "label", "original_label", "sentence"),
    ),
    "sst2": GlueSpec("sst2", "SST-2", {"sentence": "sentence"}, "label", _STD,
                     {"train": 67349, "validation": 872, "test": 1821}),
    "mrpc": GlueSpec("mrpc", "MRPC", {"sentence1": "#1 String", "sentence2": "#2 String"}, "Quality", _STD,
                     {"train": 3668, "validation": 408, "test": 1725}),
    "qqp": GlueSpec("qqp", "QQP", {"question1": "question1", "question2": "question2"}, "is_duplicate", _STD,
                    {"train": 363846, "validation": 40430, "test": 390965}),
    "stsb": GlueSpec("stsb", "STS-B", {"sentence1": "sentence1", "sentence2": "sentence2"}, "score", _STD,
                     {"train": 5749, "validation": 1500, "test": 1379}),
    "mnli": GlueSpec(
        "mnli", "MNLI", {"premise": "sentence1", "hypothesis": "sentence2"}, "gold_label",
        {"train": "train.tsv", "validation": "dev_matched.tsv", "test": "test_matched.tsv"},
        {"train": 392702, "validation": 9815, "test": 9796},
    ),
    "mnli_mismatched": GlueSpec(
        "mnli_mismatched", "MNLI", {"premise": "sentence1", "hypothesis": "sentence2"}, "gold_label",
        {"train": "train.tsv", "validation": "dev_mismatched.tsv", "test": "test_mismatched.tsv"},
        {"train": 392702, "validation": 9832, "test": 9847},
    ),
    "qnli": GlueSpec("qnli", "QNLI", {"question": "question", "sentence": "sentence"}, "label", _STD,
                     {"train": 104743, "validation": 5463, "test": 5463}),
    "rte": GlueSpec("rte", "RTE", {"sentence1": "sentence1", "sentence2": "sentence2"}, "label", _STD,
                    {"train": 2490, "validation": 277, "test": 3000}),
    "wnli": GlueSpec("wnli", "WNLI", {"sentence1": "sentence1", "sentence2": "sentence2"}, "label", _STD,
                     {"train": 635, "validation": 71, "test": 146}),
}


def read_glue(path: Path, split: str, spec: GlueSpec) -> list[Row]:
    """One GLUE TSV file as TFDS-layout rows; unlabelled (test) rows get label -1 as in TFDS.

    The split decides the layout: test files have no label column, and CoLA's have a header where the others have
    none.
    """
    labelled = split not in spec.test_splits
    label_classes = _CONFIGS[spec.config].label_classes
    fieldnames = spec.columns if labelled else None
    rows = []
    for idx, (line, fields) in enumerate(read_tsv(path, fieldnames)):
        try:
            row: Row = {"idx": idx}
            for feature, column in spec.text.items():
                row[feature] = fields[column]
            if not labelled:
                row["label"] = -1.0 if spec.config == "stsb" else -1
            elif spec.config == "stsb":
                row["label"] = float(fields[spec.label])
            else:
                row["label"] = _class_id(fields[spec.label], label_classes)
        except KeyError as e:
            raise DataFormatError(f"{path}: no column {e} in the header; expected the official GLUE layout") from e
        except ValueError as e:
            raise DataFormatError(f"{path}:{line}: {e}") from e
        rows.append(row)
    return rows


def _class_id(value: str, label_classes: list[str]) -> int:
    if value in label_classes:
        return label_classes.index(value)
    if value.isdigit() and int(value) < len(label_classes):
        return int(value)
    raise ValueError(f"label {value!r} is none of {label_classes} or their ids 0..{len(label_classes) - 1}")


def matthews_corrcoef(targets: list[int], predictions: list[int]) -> dict[str, float]:
    """t5's CoLA metric (scikit-learn's Matthews correlation, in percent), under a name that says what it is."""
    return _COLA_METRIC(targets, predictions)


_COLA_METRIC = glue_utils.get_glue_metric("cola")[0]
_METRICS = {"cola": [matthews_corrcoef]}


# Each corpus-level metric's bootstrap replicates, all 1,000 resamples at once (`stats.register_replicates`, which
# checks each against the metric itself before using it): recomputing t5's F1 and scikit-learn's Matthews
# correlation once per resample took 1.4 and 1.7 s on 100 examples, 2.9 and 3.5 s on 1,000.
def _matthews_replicates(targets: list, predictions: list, indices: np.ndarray) -> dict[str, np.ndarray]:
    return {"matthews_corrcoef": 100 * stats.matthews_corrcoef(stats.confusion_matrices(targets, predictions,
                                                                                            indices))}


def _f1_with_invalid_replicates(targets: list, predictions: list, indices: np.ndarray) -> dict[str, np.ndarray]:
    """t5's `f1_score_with_invalid`: F1 of class 1, a prediction other than 0 or 1 counted wrong."""
    gold, predicted = np.asarray(targets), np.asarray(predictions)
    predicted = np.where((predicted == 0) | (predicted == 1), predicted, 1 - gold)
    counts = np.stack([(gold == 1) & (predicted == 1), (gold == 0) & (predicted == 1),
                       (gold == 1) & (predicted == 0)], axis=1)
    tp, fp, fn = stats.resampled_sums(counts, indices).T
    return {"f1": 100 * stats.f1(tp, fp, fn)}


def _resampled(values: list, indices: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)[indices]


stats.register_replicates(matthews_corrcoef, _matthews_replicates)
stats.register_replicates(t5_metrics.f1_score_with_invalid, _f1_with_invalid_replicates)
stats.register_replicates(t5_metrics.pearson_corrcoef, lambda targets, predictions, indices: {
    "pearson_corrcoef": 100 * stats.pearson(_resampled(targets, indices), _resampled(predictions, indices))})
stats.register_replicates(t5_metrics.spearman_corrcoef, lambda targets, predictions, indices: {
    "spearman_corrcoef": 100 * stats.spearman(_resampled(targets, indices), _resampled(predictions, indices))})


def _register(spec: GlueSpec) -> None:
    config = _CONFIGS[spec.config]
    splits = {split: f"glue/{spec.directory}/{name}" for split, name in spec.splits.items()}
    source = FileSource(
        task_name=f"glue_{spec.config}",
        split_paths=splits,
        reader=functools.partial(read_glue, spec=spec),
        num_input_examples=spec.sizes,
    )
    seqio.TaskRegistry.add(
        f"glue_{spec.config}",
        source=source,
        preprocessors=tokenized_and_cached(glue_utils.get_glue_text_preprocessor(config)),
        postprocess_fn=glue_utils.get_glue_postprocess_fn(config),
        metric_fns=_METRICS.get(spec.config) or glue_utils.get_glue_metric(spec.config),
        output_features=OUTPUT_FEATURES,
    )
    if config.label_classes:  # the targets are the class names (t5's preprocessor): rank classification applies
        catalog.register_labels(f"glue_{spec.config}", config.label_classes)


for _spec in SPECS.values():
    _register(_spec)

GLUE_TASKS = tuple(f"glue_{name}" for name in SPECS)
