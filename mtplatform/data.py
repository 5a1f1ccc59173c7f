"""The input pipeline: a seqio task or mixture -> packed, batched torch tensors, with a saveable position.

seqio builds the stream (sampling from a mixture, preprocessing, shuffling, `EncDecFeatureConverter` packing),
tf.data batches and prefetches it in TensorFlow's own background threads, and we hand each batch to torch without a
copy. The position in the stream is saved with `tf.train.Checkpoint` over the iterator: restoring it continues with
exactly the next batch, in constant time, without replaying the stream. There is deliberately no prefetching
thread of our own on top: batches it held would be missing from the saved position (ARCHITECTURE.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import gin
import seqio
import tensorflow as tf
import torch


@gin.configurable(denylist=["shard_index", "num_shards"])
def train_dataset(
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    batch_size: int = gin.REQUIRED,
    split: str = "train",
    pack: bool = True,
    seed: int = 0,
    shard_index: int = 0,
    num_shards: int = 1,
) -> tf.data.Dataset:
    """An endless, shuffled, packed stream of batches of `batch_size` rows for shard `shard_index` of `num_shards`.

    Each shard (one per training process) reads its own part of every task's source (seqio `ShardInfo`).
    """
    ds = seqio.get_dataset(
        mixture_or_task_name,
        task_feature_lengths=dict(task_feature_lengths),
        dataset_split=split,
        shuffle=True,
        num_epochs=None,
        feature_converter=seqio.EncDecFeatureConverter(pack=pack),
        shard_info=seqio.ShardInfo(index=shard_index, num_shards=num_shards) if num_shards > 1 else None,
        use_cached=False,
        seed=seed,
    )
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


class BatchIterator(Iterator[dict[str, torch.Tensor]]):
    """Torch batches from a tf.data dataset, whose position can be saved and restored exactly."""

    def __init__(self, dataset: tf.data.Dataset):
        self._iterator = iter(dataset)
        self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = next(self._iterator)
        return {k: torch.from_numpy(v.numpy()) for k, v in batch.items()}

    def save(self, directory: Path) -> None:
        """Write the iterator state under `directory` (created)."""
        directory.mkdir(parents=True, exist_ok=True)
        self._checkpoint.write(str(directory / "iterator"))

    def restore(self, directory: Path) -> None:
        """Continue from a state written by `save` for the same pipeline."""
        prefix = directory / "iterator"
        if not Path(str(prefix) + ".index").is_file():
            raise FileNotFoundError(f"{directory}: no saved data iterator (expected {prefix}.index)")
        self._checkpoint.read(str(prefix)).assert_consumed()
