"""The input stream of an online-mixing run: batches drawn task by task at shares that change between steps.

Why not the fixed-rate pipeline (`data.train_dataset`): `sample_from_datasets` draws inside tf.data, which packs
hundreds of examples and prefetches batches ahead of the step that uses them, at times no run can repeat. Shares
that follow the losses of step t must govern exactly the batches after step t, in a run and in its resumed twin.
So the mixing leaves tf.data here: each task keeps its own tf.data iterator (seqio's shuffled, repeated stream,
read in chunks of `CHUNK` examples and prefetched by TensorFlow), a seeded numpy generator picks each example's
task by the current shares, and examples are packed first-fit in numpy into rows, converted to the model's
features exactly as `data.TaskIdFeatureConverter` does (a test compares the two). Batches are built synchronously,
when the step asks for one, so the shares in force are always those of the step (drawing and packing a batch
costs about a millisecond; `benchmarks/input_pipeline.py --online` measures the wait).

The position is exact and restorable: every task's tf.data iterator (`tf.train.Checkpoint`), the generator's state,
the uniforms it drew but did not use, the examples fetched but not drawn, and the rows still open. Rows stay open
until the pool holds `POOL_FACTOR` batches of them (first fit over many open rows packs as densely as the fixed
pipeline's buffer); the oldest `batch_size` rows form the next batch.

This module knows numpy and TensorFlow (for the per-task iterators), not torch's training loop.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import seqio
import tensorflow as tf
import torch

from mtplatform import data
from mtplatform.tf_setup import without_autotune

CHUNK = 32  # examples fetched from a task's iterator at a time
READY = 2 * CHUNK  # examples per task the background thread keeps fetched ahead
POOL_FACTOR = 2  # open rows held, in batches: more packs denser, and delays examples longer
UNIFORMS = 4096  # uniforms drawn at a time to pick tasks
STATE_FILE = "online_stream.json"


class OnlineStream(Iterator[dict[str, torch.Tensor]]):
    """Batches of `batch_size` rows over `names` (task ids 1..K in that order), drawn by `set_shares`' shares."""

    def __init__(self, names: Sequence[str], mixture: str, task_feature_lengths: Mapping[str, int],
                 batch_size: int, pack: bool, seed: int, shard_index: int = 0, num_shards: int = 1):
        self.names, self.pack, self.batch_size = list(names), pack, batch_size
        self.lengths = {"inputs": int(task_feature_lengths["inputs"]), "targets": int(task_feature_lengths["targets"])}
        shard = seqio.ShardInfo(index=shard_index, num_shards=num_shards) if num_shards > 1 else None
        self._fetcher = _Fetcher([self._chunks(name, i, mixture, task_feature_lengths, seed, shard)
                                  for i, name in enumerate(self.names, start=1)])
        self._rng = np.random.Generator(np.random.PCG64([seed, shard_index]))
        self._uniforms: np.ndarray = np.empty(0)
        self._used = 0  # uniforms of `_uniforms` used
        self._rows: list[Row] = []  # open rows
        self._room: list[list[int]] = []  # tokens used per open row: [inputs, targets]
        self._cumulative = np.linspace(1.0 / len(self.names), 1.0, len(self.names))

    def _chunks(self, name: str, task_id: int, mixture: str, lengths: Mapping[str, int], seed: int,
                shard: seqio.ShardInfo | None) -> tf.data.Dataset:
        ds = data.task_examples(name, task_id, mixture, lengths, "train", seed, shard)
        li, lt = self.lengths["inputs"], self.lengths["targets"]
        trimmed = ds.map(lambda ex: {"inputs": ex["inputs"][:li], "targets": ex["targets"][:lt]},
                         num_parallel_calls=tf.data.AUTOTUNE)
        return trimmed.padded_batch(CHUNK, padded_shapes={"inputs": [li], "targets": [lt]}).prefetch(2)

    def set_shares(self, shares: Sequence[float]) -> None:
        """Draw by `shares` (one per task, summing to 1) from the next example on."""
        shares = np.asarray(shares, dtype=np.float64)
        if shares.shape != (len(self.names),) or not np.all(np.isfinite(shares)) or np.any(shares < 0):
            raise ValueError(f"online stream: shares {shares.tolist()} must be {len(self.names)} finite numbers >= 0")
        cumulative = np.cumsum(shares / shares.sum())
        cumulative[-1] = 1.0
        self._cumulative = cumulative

    # --- drawing and packing ---------------------------------------------------------------------------------

    def _draw(self) -> tuple[int, np.ndarray, np.ndarray]:
        if self._used == len(self._uniforms):
            self._uniforms, self._used = self._rng.random(UNIFORMS), 0
        u = self._uniforms[self._used]
        self._used += 1
        index = int(np.searchsorted(self._cumulative, u, side="right"))
        index = min(index, len(self.names) - 1)
        inputs, targets = self._fetcher.pop(index)
        return index + 1, inputs, targets

    def __next__(self) -> dict[str, torch.Tensor]:
        capacity = POOL_FACTOR * self.batch_size if self.pack else self.batch_size
        while len(self._rows) <= capacity:
            place(self._rows, self._room, self._draw(), self.lengths, self.pack)
        rows = self._rows[:self.batch_size]
        self._rows, self._room = self._rows[self.batch_size:], self._room[self.batch_size:]
        self._fetcher.wake()
        return {k: torch.from_numpy(v) for k, v in features(rows, self.lengths, self.pack).items()}

    # --- position --------------------------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Write the stream's exact position under `directory` (created)."""
        directory.mkdir(parents=True, exist_ok=True)
        with self._fetcher.paused():
            pending = self._fetcher.write(directory / "iterators")
        state = {
            "names": self.names, "pack": self.pack, "lengths": self.lengths, "batch_size": self.batch_size,
            "rng": self._rng.bit_generator.state, "uniforms": self._uniforms.tolist(), "used": self._used,
            "cumulative": self._cumulative.tolist(),
            "pending": [[[ex[0].tolist(), ex[1].tolist()] for ex in p] for p in pending],
            "rows": [[[t, i.tolist(), g.tolist()] for t, i, g in row] for row in self._rows],
        }
        (directory / STATE_FILE).write_text(json.dumps(state) + "\n")

    def restore(self, directory: Path) -> None:
        """Continue from a position written by `save` for the same tasks, lengths, batch and packing."""
        state_file = directory / STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(f"{directory}: no saved online-mixing stream (expected {state_file}); was it "
                                    "written by a run at fixed rates? Resume with the strategy it began with")
        state = json.loads(state_file.read_text())
        mine = {"names": self.names, "pack": self.pack, "lengths": self.lengths, "batch_size": self.batch_size}
        for key, value in mine.items():
            if state[key] != value:
                raise ValueError(f"{state_file}: saved with {key} {state[key]!r}, this run has {value!r}; resume it "
                                 "with the settings it began with")
        with self._fetcher.paused():
            self._fetcher.read(directory / "iterators", [[(np.array(i, np.int32), np.array(g, np.int32)) for i, g in p]
                                                         for p in state["pending"]])
        self._rng.bit_generator.state = state["rng"]
        self._uniforms, self._used = np.array(state["uniforms"], dtype=np.float64), int(state["used"])
        self._cumulative = np.array(state["cumulative"], dtype=np.float64)
        self._rows = [[(int(t), np.array(i, np.int32), np.array(g, np.int32)) for t, i, g in row]
                      for row in state["rows"]]
        self._room = [[sum(len(i) for _, i, _ in row), sum(len(g) for _, _, g in row)] for row in self._rows]


class _Fetcher:
    """Each task's examples, fetched from its tf.data iterator in chunks, in its stream's order, and a background
    thread that keeps `READY` of them fetched ahead for every task, so that a step rarely waits for TensorFlow.

    Which task an example is drawn from depends on the shares; which example a task gives next does not (each
    task's queue is first in, first out), so fetching ahead changes no batch. A saved position holds the iterators'
    state and the examples fetched but not drawn, written while the thread is paused.
    """

    def __init__(self, datasets: Sequence[tf.data.Dataset]):
        # Without autotuning (`tf_setup.without_autotune`); a position saved by autotuned iterators restores alike.
        self._iterators = [iter(without_autotune(ds)) for ds in datasets]
        self._checkpoint = tf.train.Checkpoint(**{f"task_{i}": it for i, it in enumerate(self._iterators)})
        self._pending: list[deque] = [deque() for _ in datasets]  # (inputs, targets), trimmed to their lengths
        self._lock = threading.Lock()  # held while fetching, saving or restoring
        self._wanted = threading.Event()
        self._failure: BaseException | None = None
        self._thread: threading.Thread | None = None

    def pop(self, task: int) -> tuple[np.ndarray, np.ndarray]:
        """The next example of task index `task` (fetched now if none is ready)."""
        if self._failure is not None:
            raise self._failure
        if not self._pending[task]:
            with self._lock:
                if not self._pending[task]:
                    self._fetch(task)
        return self._pending[task].popleft()

    def _fetch(self, task: int) -> None:
        chunk = next(self._iterators[task])
        inputs, targets = chunk["inputs"].numpy(), chunk["targets"].numpy()
        sizes_in, sizes_tg = (inputs != 0).sum(axis=1), (targets != 0).sum(axis=1)
        self._pending[task].extend((inputs[j, :sizes_in[j]].copy(), targets[j, :sizes_tg[j]].copy())
                                   for j in range(len(inputs)))

    def wake(self) -> None:
        """Top the queues up in the background (the thread starts on the first call, after any restore)."""
        if self._thread is None:
            self._thread = threading.Thread(target=_fill_ahead, args=(weakref.ref(self), self._wanted),
                                            name="online-stream-fetch", daemon=True)
            self._thread.start()
        self._wanted.set()

    def _fill_once(self) -> None:
        for task, pending in enumerate(self._pending):
            if len(pending) < READY:
                with self._lock:
                    if len(pending) < READY:
                        self._fetch(task)

    def paused(self) -> threading.Lock:
        """`with fetcher.paused():` no fetch runs inside."""
        return self._lock

    def write(self, prefix: Path) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """Save the iterators at `prefix`; return the examples fetched but not drawn (call while paused)."""
        self._checkpoint.write(str(prefix))
        return [list(p) for p in self._pending]

    def read(self, prefix: Path, pending: list[list[tuple[np.ndarray, np.ndarray]]]) -> None:
        """Restore what `write` saved (call while paused)."""
        self._checkpoint.read(str(prefix)).assert_consumed()
        for queue, examples in zip(self._pending, pending, strict=True):
            queue.clear()
            queue.extend(examples)


def _fill_ahead(fetcher_ref: weakref.ref, wanted: threading.Event) -> None:
    """The background thread of a `_Fetcher`: tops its queues up after every batch; ends with the fetcher (a weak
    reference, so that a stream nobody holds is freed) or on the first error, which the next draw raises."""
    while wanted.wait(timeout=1.0) or fetcher_ref() is not None:
        wanted.clear()
        fetcher = fetcher_ref()
        if fetcher is None:
            return
        try:
            fetcher._fill_once()
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, which raises it
            fetcher._failure = e
            return
        del fetcher


Row = list[tuple[int, np.ndarray, np.ndarray]]  # a row's examples: (task id, inputs, targets)


def place(rows: list[Row], room: list[list[int]], example: tuple[int, np.ndarray, np.ndarray],
          lengths: Mapping[str, int], pack: bool) -> None:
    """First fit (as `mtplatform.packing`): put `example` into the first of `rows` with room for both of its
    features (`room`: the tokens each row holds), else into a new row; unpacked, every example opens a row."""
    _, inputs, targets = example
    if pack:
        for row, used in zip(rows, room, strict=True):
            if used[0] + len(inputs) <= lengths["inputs"] and used[1] + len(targets) <= lengths["targets"]:
                row.append(example)
                used[0] += len(inputs)
                used[1] += len(targets)
                return
    rows.append([example])
    room.append([len(inputs), len(targets)])


def features(rows: Sequence[Row], lengths: Mapping[str, int], pack: bool) -> dict[str, np.ndarray]:
    """The model's features for `rows` of (task id, inputs, targets) examples, as `data.TaskIdFeatureConverter`
    makes them (seqio's `EncDecFeatureConverter`: decoder inputs are the targets shifted right within each
    segment; unpacked rows carry no segment ids or positions)."""
    out = {}
    for key, prefix, column in (("inputs", "encoder", 1), ("targets", "decoder", 2)):
        tokens, segments, positions = (np.zeros((len(rows), lengths[key]), np.int32) for _ in range(3))
        for r, row in enumerate(rows):
            sizes = np.array([len(ex[column]) for ex in row])
            end = int(sizes.sum())
            tokens[r, :end] = np.concatenate([ex[column] for ex in row])
            segments[r, :end] = np.repeat(np.arange(1, len(row) + 1, dtype=np.int32), sizes)
            positions[r, :end] = np.arange(end) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        kind = "input" if key == "inputs" else "target"
        out.update({f"{prefix}_{kind}_tokens": tokens, f"{prefix}_segment_ids": segments,
                    f"{prefix}_positions": positions})
    task_of_segment = np.zeros((len(rows), max(len(row) for row in rows) + 1), np.int32)
    for r, row in enumerate(rows):
        task_of_segment[r, 1:len(row) + 1] = [ex[0] for ex in row]
    out[data.TASK_IDS] = np.take_along_axis(task_of_segment, out["decoder_segment_ids"], axis=1)
    targets = out["decoder_target_tokens"]
    shifted = np.zeros_like(targets)
    shifted[:, 1:] = targets[:, :-1]
    if pack:  # seqio.utils.make_autoregressive_inputs with sequence ids: 0 where a segment (or padding) begins
        ids = out["decoder_segment_ids"]
        previous = np.zeros_like(ids)
        previous[:, 1:] = ids[:, :-1]
        shifted = shifted * (ids == previous)
    out["decoder_input_tokens"] = shifted
    out["decoder_loss_weights"] = (targets != 0).astype(np.int32)
    if not pack:
        for name in ("encoder_segment_ids", "encoder_positions", "decoder_segment_ids", "decoder_positions"):
            del out[name]
    return out
