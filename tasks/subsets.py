"""Low-resource copies of a task: the same task trained on a fixed subset of its training examples.

`register_subset("glue_sst2", 256)` registers `glue_sst2_train256`: the same files, preprocessing, metrics and
labels, with its training split cut to 256 examples drawn once, without replacement, by a generator seeded with the
subset size alone (the same examples in every arm, run and seed; a larger subset is drawn independently, so
subsets are not nested), kept in file order. Validation and test splits are the task's own.
"""

from __future__ import annotations

import numpy as np
import seqio

from mtplatform import catalog
from tasks.sources import FileSource, Row, TextSource

SUBSET_SPLIT = "train"


class SubsetSource(FileSource):
    """A FileSource whose training split is a fixed random subset of `size` rows of another's."""

    def __init__(self, task_name: str, source: FileSource, size: int):
        declared = {split: n for split in source.splits
                    if (n := source.declared_examples(split)) is not None}
        if SUBSET_SPLIT in declared:
            declared[SUBSET_SPLIT] = min(size, declared[SUBSET_SPLIT])
        super().__init__(task_name, source._split_paths, source._reader, declared)
        self._size = size

    def read_rows(self, split: str) -> list[Row]:
        rows = super().read_rows(split)
        if split != SUBSET_SPLIT or len(rows) <= self._size:
            return rows
        chosen = np.random.default_rng(self._size).choice(len(rows), size=self._size, replace=False)
        return [rows[i] for i in sorted(chosen)]


def subset_name(task_name: str, size: int | None) -> str:
    """The name of `task_name` cut to `size` training examples (the task itself for None: all of them)."""
    return task_name if size is None else f"{task_name}_train{size}"


def register_subset(task_name: str, size: int | None) -> str:
    """Register `task_name` with its training split cut to `size` examples (None: the task itself); its name."""
    if size is None:
        return task_name
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"task {task_name}: a training subset needs a positive integer size, got {size!r}")
    task = seqio.get_mixture_or_task(task_name)
    source = getattr(task, "source", None)
    if not isinstance(source, FileSource) or isinstance(source, TextSource):  # a corpus streams; it has no rows
        raise ValueError(f"task {task_name}: only a task read from files (GLUE, SQuAD, CoNLL, register_file_task) "
                         "can be cut to a training subset")
    name = subset_name(task_name, size)
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(name, source=SubsetSource(name, source, size), preprocessors=task.preprocessors,
                           output_features=task.output_features, postprocess_fn=task.postprocess_fn,
                           metric_fns=task.metric_fns)
    if task_name in catalog.LABELS:
        catalog.register_labels(name, catalog.LABELS[task_name])
    return name
