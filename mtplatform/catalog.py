"""Looking into registered tasks and mixtures: their splits, sizes, metrics, raw text and examples.

Used by `mtp tasks` and `mtp vocab`; it knows seqio, not torch. It holds the label sets that tasks declare
(`register_labels`), so that registering a task loads no torch (3 s of `mtp tasks`, `mtp vocab` and `mtp cache`).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import seqio

user_modules: list[str] = []
"""The `--module`s imported so far, in order: what an experiment's stage processes import again."""

LABELS: dict[str, tuple[str, ...]] = {}
"""Task name -> its closed label set (the target texts a prediction can be), for rank classification."""


def register_labels(task_name: str, labels: Sequence[str]) -> None:
    """Declare that `task_name`'s targets are one of `labels` (at least two distinct texts)."""
    labels = tuple(labels)
    if len(set(labels)) < 2 or len(set(labels)) != len(labels):
        raise ValueError(f"task {task_name}: a label set needs two or more distinct labels, got {list(labels)}")
    LABELS[task_name] = labels


def import_modules(modules: Sequence[str]) -> None:
    """Import the built-in catalogue and each user module that registers tasks (`--module my_tasks`)."""
    importlib.import_module("tasks")
    for module in modules:
        try:
            importlib.import_module(module)
            if module not in user_modules:
                user_modules.append(module)
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(
                f"--module {module}: cannot import it ({e}); is its directory on PYTHONPATH or the current one?"
            ) from e
        except Exception as e:  # the user's code failed: say whose, and how
            raise ValueError(f"--module {module}: importing it raised {type(e).__name__}: {e}") from e


def tasks_of(name: str) -> list[seqio.Task]:
    """The tasks of a task or mixture name (or of several, comma-separated), with a clear error for an unknown name."""
    if "," in name:
        return [task for part in name.split(",") if part.strip() for task in tasks_of(part.strip())]
    try:
        provider = seqio.get_mixture_or_task(name)
    except ValueError as e:
        known = sorted(seqio.TaskRegistry.names()) + sorted(seqio.MixtureRegistry.names())
        raise ValueError(f"no task or mixture named {name!r}; registered: {', '.join(known)}") from e
    return list(provider.tasks) if isinstance(provider, seqio.Mixture) else [provider]


@dataclass(frozen=True)
class TaskSummary:
    name: str
    splits: dict[str, int | None]  # examples read from the files (declared, for sources that cannot count)
    declared: dict[str, int | None]  # the official sizes given at registration
    metrics: list[str]
    missing_files: dict[str, str]  # split -> the expected file that is not under the data directory


def summarize(task: seqio.Task) -> TaskSummary:
    """Splits with the example counts their files hold, the official counts, missing files and metric names."""
    metric_names = [getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", repr(fn))
                    for fn in task.metric_fns]
    source = task.source
    if not hasattr(source, "missing"):  # not our FileSource: it can only declare
        counts = {s: task.num_input_examples(s) for s in task.splits}
        return TaskSummary(task.name, counts, counts, metric_names, {})
    missing = {s: where for s in task.splits if (where := source.missing(s))}
    counts = {s: None if s in missing else source.count(s) for s in task.splits}
    declared = {s: source.declared_examples(s) for s in task.splits}
    return TaskSummary(task.name, counts, declared, metric_names, missing)


def _is_tokenizer(fn) -> bool:
    fn = getattr(fn, "func", fn)
    return fn in (seqio.preprocessors.tokenize, seqio.preprocessors.tokenize_and_append_eos)


READ_BATCH = 1024  # examples tf.data hands over at once (`pretokenized`)


def pretokenized(task: seqio.Task, split: str, max_examples: int | None = None) -> Iterator[dict]:
    """Examples of a task after its preprocessors up to the tokenizer: text as the model will read it (with
    prefixes such as `sst2 sentence:` and label words), in file order; their scalar features (`inputs`,
    `targets`, ids), read READ_BATCH at a time: tf.data's iterator costs about 0.35 ms a step, so one example at a
    time 20,000 of SST-2's took 7.3 s against 1.0 (every experiment's constant baselines read them)."""
    steps = list(task.preprocessors)
    cut = next((i for i, p in enumerate(steps) if _is_tokenizer(p)), len(steps))
    ds = task.source.get_dataset(split=split, shuffle=False)
    for step in steps[:cut]:
        ds = seqio.utils.add_kwargs_to_transform(step, sequence_length=None, output_features=task.output_features)(ds)
    if max_examples is not None:
        ds = ds.take(max_examples)
    scalars = ds.map(lambda ex: {k: v for k, v in ex.items() if v.shape.rank == 0})
    for batch in scalars.batch(READ_BATCH).as_numpy_iterator():
        for i in range(len(batch["targets"])):
            yield {k: v[i] for k, v in batch.items()}


def raw_texts(task: seqio.Task, split: str, max_examples: int | None = None) -> Iterator[str]:
    """The text a task feeds its tokenizer (its `inputs` and `targets` strings), so that a vocabulary is trained on
    what the model will read, not just on the raw files."""
    for ex in pretokenized(task, split, max_examples):
        for key in ("inputs", "targets"):
            if key in ex and key in task.output_features:
                yield ex[key].decode("utf-8")
