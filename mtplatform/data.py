"""The input pipeline: a seqio task or mixture -> packed, batched torch tensors, with a saveable position.

seqio builds the stream (sampling from a mixture, preprocessing, shuffling, `EncDecFeatureConverter`, with the
first-fit packing of `mtplatform.packing`), tf.data batches and prefetches it in TensorFlow's own background
threads, and we hand each batch to torch without a copy. The position in the stream is saved with
`tf.train.Checkpoint` over the iterator: restoring it continues with exactly the next batch, in constant time,
without replaying the stream. There is deliberately no prefetching thread of our own on top: batches it held
would be missing from the saved position.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import gin
import numpy as np
import seqio
import tensorflow as tf
import torch

from mtplatform import cache, mixing, packing
from mtplatform.tf_setup import without_autotune

PACKINGS = ("first_fit", "seqio")  # mtplatform.packing's dense packer, or seqio's own (next fit)
PIPELINE_FILE = "pipeline.json"  # beside a saved data position: how its rows were packed, whether it autotuned
UNPACKED = "none"  # the packing a data position records for unpacked rows (train.pack = False)
LEGACY_PACKINGS = ("seqio", UNPACKED)  # what a position saved before PIPELINE_FILE existed may have used
TASK_IDS = "decoder_task_ids"  # per target token: 1 + the index of its example's task in `task_names`; 0 = padding


class TaskIdFeatureConverter(seqio.EncDecFeatureConverter):
    """seqio's encoder-decoder converter, carrying each target token's task through packing as `decoder_task_ids`.

    seqio refuses pass-through features when packing; a task feature (`targets_task`, as long as `targets`) is
    packed like the targets themselves, so it stays aligned with them in packed and unpacked batches alike.
    """

    TASK_FEATURES = {**seqio.EncDecFeatureConverter.TASK_FEATURES,
                     "targets_task": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)}
    MODEL_FEATURES = {**seqio.EncDecFeatureConverter.MODEL_FEATURES,
                      TASK_IDS: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)}

    def __init__(self, pack: bool = True, packing: str = "first_fit", **kwargs):
        if packing not in PACKINGS:
            raise ValueError(f"train.packing={packing!r}: use one of {', '.join(PACKINGS)}")
        super().__init__(pack=pack, **kwargs)
        self._packing = packing

    def _pack_or_pad(self, ds: tf.data.Dataset, packed_lengths: Mapping[str, int]) -> tf.data.Dataset:
        if self.pack and self._packing == "first_fit":
            return packing.pack_dataset(ds, packed_lengths)
        return super()._pack_or_pad(ds, packed_lengths)

    def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        return super().__call__(ds, {**task_feature_lengths, "targets_task": task_feature_lengths["targets"]})

    def _convert_example(self, features: Mapping[str, tf.Tensor]) -> Mapping[str, tf.Tensor]:
        return {**super()._convert_example(features), TASK_IDS: features["targets_task"]}

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
        lengths = super().get_model_feature_lengths(task_feature_lengths)
        return {**lengths, TASK_IDS: lengths["decoder_target_tokens"]}


def _with_task_id(ds: tf.data.Dataset, task_id: int) -> tf.data.Dataset:
    def add(ex):
        return {"inputs": ex["inputs"], "targets": ex["targets"],
                "targets_task": tf.fill(tf.shape(ex["targets"]), tf.constant(task_id, tf.int32))}

    return ds.map(add, num_parallel_calls=tf.data.AUTOTUNE)


def mixed_examples(
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    split: str = "train",
    seed: int | None = 0,
    shard_info: seqio.ShardInfo | None = None,
    budget_examples: float | None = None,
    resolved: mixing.Resolved | None = None,
) -> tuple[tf.data.Dataset, mixing.Resolved]:
    """An endless shuffled stream of a task's or mixture's examples, each tagged with its task, and the rates used.

    For a mixture this is what `seqio.Mixture.get_dataset` does (one dataset per task, the same seed for each,
    `sample_from_datasets` by rate), with two differences that need the task of each example: the task id is
    added before sampling, and the rates are resolved once (`mixing.resolve`), dropping tasks without data where
    configured. Task ids follow `resolved.rates` (sorted by name, as seqio orders a mixture's tasks). A task with
    a fresh cache in the configured cache directories is read from it (`mtplatform.cache`). `resolved`: rates
    already resolved (a run's, `resolve_rates`), used as they are.
    """
    if resolved is None:
        resolved = mixing.resolve(seqio.get_mixture_or_task(mixture_or_task_name), budget_examples)
    datasets = [task_examples(name, task_id, mixture_or_task_name, task_feature_lengths, split, seed, shard_info)
                for task_id, name in enumerate(resolved.rates, start=1)]
    if len(datasets) == 1:
        return datasets[0], resolved
    weights = list(resolved.rates.values())
    mixed = tf.data.Dataset.sample_from_datasets(datasets, weights=weights, seed=seed, stop_on_empty_dataset=True)
    return mixed, resolved


def task_examples(name: str, task_id: int, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                  split: str, seed: int | None, shard_info: seqio.ShardInfo | None) -> tf.data.Dataset:
    """Task `name`'s endless shuffled stream of examples (from its cache where fresh), tagged with `task_id`."""
    task = seqio.get_mixture_or_task(name)
    if split not in task.splits:
        raise ValueError(f"task {name} (in {mixture_or_task_name}) has no {split!r} split; it has {task.splits}")
    ds = task.get_dataset(dict(task_feature_lengths), split=split, use_cached=cache.use_cached(task),
                          shuffle=True, seed=seed, shard_info=shard_info, num_epochs=None)
    return _with_task_id(ds, task_id)


@gin.configurable(denylist=["shard_index", "num_shards", "budget_rows", "packing", "resolved"])  # train.packing
def train_dataset(
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    batch_size: int = gin.REQUIRED,
    split: str = "train",
    pack: bool = True,
    packing: str = "first_fit",
    seed: int = 0,
    shard_index: int = 0,
    num_shards: int = 1,
    budget_rows: float | None = None,
    resolved: mixing.Resolved | None = None,
) -> tuple[tf.data.Dataset, mixing.Resolved]:
    """An endless, shuffled, packed stream of batches of `batch_size` rows for shard `shard_index` of `num_shards`,
    and the mixture's resolved rates (its task names give the meaning of `decoder_task_ids`).

    Each shard (one per training process) reads its own part of every task's source (seqio `ShardInfo`).
    `packing` "first_fit" (mtplatform.packing) fills rows more densely than seqio's own packer ("seqio", next
    fit), which runs from before 2026-11-26 used; a saved data position restores only into the packing that
    wrote it. `resolved`: the run's rates (`resolve_rates`); without them, they are resolved here, and
    `budget_rows`, the rows the run will read (over all shards), sets UniMax's budget (`budget_examples`).
    """
    shard_info = seqio.ShardInfo(index=shard_index, num_shards=num_shards) if num_shards > 1 else None
    if resolved is None:
        resolved = resolve_rates(mixture_or_task_name, task_feature_lengths, budget_rows, pack, packing, seed)
    ds, resolved = mixed_examples(mixture_or_task_name, task_feature_lengths, split, seed, shard_info,
                                  resolved=resolved)
    ds = TaskIdFeatureConverter(pack=pack, packing=packing)(ds, dict(task_feature_lengths))
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE), resolved


def resolve_rates(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int], budget_rows: float | None,
                  pack: bool, packing: str, seed: int) -> mixing.Resolved:
    """A run's rates, resolved once when it begins: under the strategy bound now, with UniMax's budget measured
    for `budget_rows` rows where it needs one (`budget_examples`)."""
    budget = budget_examples(mixture_or_task_name, task_feature_lengths, budget_rows, pack, packing, seed)
    return mixing.resolve(seqio.get_mixture_or_task(mixture_or_task_name), budget)


BUDGET_SAMPLE_ROWS = 1024  # packed rows read to measure how many examples a row holds (UniMax's budget)


def budget_examples(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int], rows: float | None,
                    pack: bool, packing: str, seed: int) -> float | None:
    """The examples a run of `rows` rows trains on, for a mixture whose rates need it (UniMax without its own
    `mixing.budget_examples`); None where no rate needs it.

    An unpacked row is one example. A packed row holds several, how many depends on the rates (short GLUE examples
    pack ten to a row, span corruption one), and the rates depend on the budget: so the budget is measured on
    the unsharded stream (the same on every process, and on every resume), twice, each time under the rates the
    previous budget gives. It is the measured mean less two standard errors, so that a task UniMax caps at
    `max_epochs` is not expected to pass it; the sampler draws around that expectation (by about 2% for RTE in
    results/mixing_strategies). Counting rows as examples instead let the smallest tasks repeat more than twice
    `max_epochs`.
    """
    provider = seqio.get_mixture_or_task(mixture_or_task_name)
    if rows is None or not mixing.needs_budget(provider):
        return None
    if not pack:
        return float(rows)
    budget = float(rows)
    for _ in range(2):
        counts = examples_per_row(mixture_or_task_name, task_feature_lengths, packing, seed, budget)
        budget = rows * max(1.0, counts.mean() - 2 * counts.std() / np.sqrt(len(counts)))
    return budget


def examples_per_row(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int], packing: str, seed: int,
                     budget: float | None = None, rows: int = BUDGET_SAMPLE_ROWS) -> np.ndarray:
    """The number of examples in each of the first `rows` packed rows of the unsharded training stream."""
    ds, resolved = mixed_examples(mixture_or_task_name, task_feature_lengths, "train", seed, None, budget)
    ds = TaskIdFeatureConverter(pack=True, packing=packing)(ds, dict(task_feature_lengths))
    return np.array([count_by_task(row[TASK_IDS][None], row["decoder_positions"][None], len(resolved.rates))[0].sum()
                     for row in without_autotune(ds.take(rows)).as_numpy_iterator()], dtype=np.float64)


def count_by_task(task_ids: np.ndarray, positions: np.ndarray | None, num_tasks: int) -> tuple[np.ndarray, np.ndarray]:
    """(examples, target tokens) per task id 0..num_tasks in a batch of `decoder_task_ids` (id 0 is padding).

    An example starts where its target's position is 0 (packed batches carry positions; unpacked rows start at
    column 0).
    """
    task_ids = np.asarray(task_ids)
    if positions is None:
        starts = np.zeros_like(task_ids, dtype=bool)
        starts[:, 0] = True
    else:
        starts = np.asarray(positions) == 0
    tokens = np.bincount(task_ids.ravel(), minlength=num_tasks + 1)
    examples = np.bincount(task_ids[starts & (task_ids > 0)].ravel(), minlength=num_tasks + 1)
    return examples, tokens


class BatchIterator(Iterator[dict[str, torch.Tensor]]):
    """Torch batches from a tf.data dataset, whose position can be saved and restored exactly.

    `packing` names how the rows were packed (UNPACKED for unpacked rows); it is saved with the position, because a
    position restores without complaint into a pipeline that packs differently, and would then not be exact.
    The pipeline runs without tf.data's autotuning (`tf_setup.without_autotune`), which changes the iterator's
    structure: a position records it, and one saved before (autotuned) resumes into an autotuned iterator.
    """

    def __init__(self, dataset: tf.data.Dataset, packing: str | None = None):
        self._dataset, self._packing = dataset, packing
        self._start(autotune=False)

    def _start(self, autotune: bool) -> None:
        self._autotune = autotune
        self._iterator = iter(self._dataset if autotune else without_autotune(self._dataset))
        self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = next(self._iterator)
        return {k: torch.from_numpy(v.numpy()) for k, v in batch.items()}

    def save(self, directory: Path) -> None:
        """Write the iterator state, whether it autotunes, and the packing (when known) under `directory` (created)."""
        directory.mkdir(parents=True, exist_ok=True)
        self._checkpoint.write(str(directory / "iterator"))
        recorded = {"packing": self._packing} if self._packing is not None else {}
        (directory / PIPELINE_FILE).write_text(json.dumps({**recorded, "autotune": self._autotune}) + "\n")

    def restore(self, directory: Path) -> None:
        """Continue from a state written by `save` for the same pipeline."""
        prefix = directory / "iterator"
        if not Path(str(prefix) + ".index").is_file():
            raise FileNotFoundError(f"{directory}: no saved data iterator (expected {prefix}.index)")
        recorded = _recorded_pipeline(directory)
        if self._packing is not None:
            self._check_packing(directory, recorded.get("packing"))
        autotune = recorded.get("autotune", True)  # a position saved before autotuning was turned off: True
        if autotune != self._autotune:
            self._start(autotune)
        self._checkpoint.read(str(prefix)).assert_consumed()

    def _check_packing(self, directory: Path, saved: str | None) -> None:
        """Refuse a position saved under another packing (`saved`), naming the setting that resumes it."""
        if saved is None:
            # Saved before packings were recorded, with rows packed by seqio or not packed: the position cannot tell
            # which, so both resume (a run that switches `pack` on such a position is not caught).
            if self._packing not in LEGACY_PACKINGS:
                raise ValueError(f"{directory}: this data position was saved before packings were recorded (seqio's "
                                 f"packer or none), and this run packs {self._packing!r}; resume it with "
                                 f"{_packing_setting('seqio')} (or {_packing_setting(UNPACKED)} if it was unpacked)")
            return
        if saved != self._packing:
            raise ValueError(f"{directory}: this data position was saved by a run that packed {saved!r}, and this "
                             f"run packs {self._packing!r}; resume it with {_packing_setting(saved)}")


def _recorded_pipeline(directory: Path) -> dict:
    """What a saved data position records of its pipeline (PIPELINE_FILE; {} where it was saved before the file
    existed)."""
    saved_file = directory / PIPELINE_FILE
    if not saved_file.is_file():
        return {}
    try:
        return json.loads(saved_file.read_text())
    except ValueError as e:
        raise ValueError(f"{saved_file}: not JSON ({e}); it records how the saved rows were packed") from None


def _packing_setting(packing: str) -> str:
    """The command-line setting that makes a run read its rows packed as `packing` (or unpacked)."""
    if packing == UNPACKED:
        return "--gin.train.pack=False"
    return f"--gin.train.pack=True --gin.train.packing=\"'{packing}'\""
