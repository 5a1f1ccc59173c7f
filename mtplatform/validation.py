"""Training settings checked before any work, each error one line naming the setting (and the task) at fault.

Without these, a bad setting surfaces late and far from its cause: `TRAIN_STEPS=0` trains nothing and exits 0,
a targets length of 0 crashes TensorFlow, `checkpoint_every=0` divides by zero after the first step, and lengths of
2 silently cut every example to nothing.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from os import PathLike

from mtplatform import settings

SAMPLE = 200  # training examples per task measured against the feature lengths
# Far above any run this platform is for, and low enough that a typo (an extra three zeros) is an error at start,
# not a stall before step 1: a feature length (attention is quadratic in it) and the tokens of one process's
# micro-batch (rows x (inputs + targets)).
MAX_FEATURE_LENGTH = 65_536
MAX_MICRO_BATCH_TOKENS = 2 ** 24
WARN_CUT_SHARE = 0.1  # more than this share of a task's examples cut by a length is reported


def positive_int(name: str, value: object, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} = {value!r}: must be a whole number >= 1" + (" (or None)" if allow_none else ""))


def whole_number(name: str, value: object, low: int = 0, high: int | None = None) -> None:
    """`value` is an int (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"from {low:,} to {high:,}"
        raise ValueError(f"{name} = {value!r}: must be a whole number {bounds}")


def number_in(name: str, value: object, low: float, high: float = math.inf, *, low_open: bool = False,
              high_open: bool = False, meaning: str = "") -> None:
    """`value` is a finite number (not a bool) in the interval from `low` to `high`, each end open or closed."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and (
        value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = (f"> {low}" if low_open else f">= {low}") if high == math.inf else \
            f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} = {value!r}: must be a number {interval}" + (f" ({meaning})" if meaning else ""))


def path_setting(name: str, value: object) -> None:
    """A directory or file setting is a path (a string), not a number."""
    if not isinstance(value, str | PathLike) or not str(value):
        raise ValueError(f"{name} = {value!r}: must be a path (a quoted string)")


def name_setting(name: str, value: object) -> None:
    """A task or mixture name is a non-empty string."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} = {value!r}: must be a task or mixture name (a quoted string)")


def non_negative_number(name: str, value: object, allow_none: bool = False, below: float | None = None) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0 \
            or (below is not None and value >= below):
        bound = f" and < {below}" if below is not None else ""
        raise ValueError(f"{name} = {value!r}: must be a finite number >= 0{bound}" + (" (or None)" if allow_none
                                                                                       else ""))


def check_train_settings(*, model_dir, mixture_or_task_name, train_steps, batch_size, task_feature_lengths,
                         grad_accum_steps, seed, checkpoint_every, keep_checkpoints, log_every, eval_every,
                         eval_num_examples, eval_max_decode_length, clip_grad_norm, dropout_rate, z_loss,
                         max_nonfinite_skips, loss_spike_factor, max_truncated_share) -> None:
    """Every scalar setting of `train` has a type and a range; the first one outside them is the error."""
    path_setting("MODEL_DIR (train.model_dir)", model_dir)
    name_setting("MIXTURE_OR_TASK_NAME (train.mixture_or_task_name)", mixture_or_task_name)
    positive_int("TRAIN_STEPS (train.train_steps)", train_steps)
    positive_int("BATCH_SIZE (train.batch_size)", batch_size)
    positive_int("train.grad_accum_steps", grad_accum_steps)
    positive_int("train.checkpoint_every", checkpoint_every)
    positive_int("train.keep_checkpoints", keep_checkpoints, allow_none=True)
    whole_number("train.seed", seed, 0, 2 ** 31 - 1)
    positive_int("train.log_every", log_every)
    non_negative_number("train.eval_every", eval_every)
    positive_int("train.eval_num_examples", eval_num_examples, allow_none=True)
    positive_int("train.eval_max_decode_length", eval_max_decode_length)
    non_negative_number("train.clip_grad_norm", clip_grad_norm, allow_none=True)
    non_negative_number("train.dropout_rate", dropout_rate, allow_none=True, below=1)
    non_negative_number("train.z_loss", z_loss)
    non_negative_number("train.max_nonfinite_skips", max_nonfinite_skips)
    non_negative_number("train.loss_spike_factor", loss_spike_factor)
    non_negative_number("train.max_truncated_share", max_truncated_share)
    if not isinstance(task_feature_lengths, Mapping) or "targets" not in task_feature_lengths:
        raise ValueError(f"TASK_FEATURE_LENGTHS = {task_feature_lengths!r}: must be a dict with a 'targets' length "
                         "(and 'inputs' for encoder-decoder tasks), as {'inputs': 512, 'targets': 114}")
    check_feature_lengths(task_feature_lengths)


def check_feature_lengths(lengths: Mapping[str, object], name: str = "TASK_FEATURE_LENGTHS") -> None:
    for feature, length in lengths.items():
        whole_number(f"{name}[{feature!r}]", length, 1, MAX_FEATURE_LENGTH)


def check_micro_batch(batch_size: int, rows_per_process: int, lengths: Mapping[str, int]) -> None:
    """One process's micro-batch (`rows_per_process` rows of every feature's length) is at most
    MAX_MICRO_BATCH_TOKENS tokens, so that an oversized batch is refused now rather than stalling the input
    pipeline; the message gives the largest BATCH_SIZE these lengths allow."""
    per_row = sum(lengths.values())
    if rows_per_process * per_row > MAX_MICRO_BATCH_TOKENS:
        largest = batch_size // rows_per_process * (MAX_MICRO_BATCH_TOKENS // per_row)
        raise ValueError(f"BATCH_SIZE = {batch_size:,}: {rows_per_process:,} rows of {per_row} tokens per process "
                         f"and micro-batch is more than {MAX_MICRO_BATCH_TOKENS:,} tokens; with these lengths it "
                         f"must be from 1 to {largest:,} (or raise train.grad_accum_steps)")


def check_lengths_fit(task_names: list[str], lengths: Mapping[str, int], max_share: float) -> None:
    """Refuse lengths that would cut more than `max_share` of a supervised task's examples, and report any that cut
    more than WARN_CUT_SHARE (T5 truncates by design; a length of 2 that cuts everything is a mistake). Measured on
    each task's first SAMPLE training examples, tokenized, EOS included; unsupervised objectives build their
    examples to fit the lengths."""
    from mtplatform import mixing  # here, not at the top: this module's checks stand without seqio

    for name in task_names:
        if name in mixing.UNSUPERVISED_TASKS:
            continue
        sizes = _example_lengths(name)
        for feature, seen in ((f, sizes[f]) for f in lengths if sizes.get(f)):
            cut = sum(n > lengths[feature] for n in seen) / max(1, len(seen))
            what = (f"TASK_FEATURE_LENGTHS[{feature!r}] = {lengths[feature]} cuts {cut:.0%} of task {name}'s "
                    f"examples (of its first {len(seen)}; median length {sorted(seen)[len(seen) // 2]} tokens)")
            if cut > max_share:
                raise ValueError(f"{what}: more than train.max_truncated_share = {max_share}; raise the length")
            if cut > WARN_CUT_SHARE:
                print(f"mtp: {what}", file=sys.stderr)


_measured: dict[tuple, dict[str, list[int]]] = {}


def _example_lengths(name: str) -> dict[str, list[int]]:
    """Token lengths of each feature of a task's first SAMPLE training examples; measured once per process for each
    task, vocabulary and data directory (an experiment's stages share the measurement)."""
    key = (name, str(settings.vocab_path()), str(settings.data_dir()))
    if key not in _measured:
        import seqio

        task = seqio.get_mixture_or_task(name)
        ds = task.get_dataset(None, split="train", shuffle=False, use_cached=False).take(SAMPLE)
        sizes: dict[str, list[int]] = {f: [] for f in task.output_features}
        for ex in ds.as_numpy_iterator():
            for feature, seen in sizes.items():
                if feature in ex:
                    seen.append(len(ex[feature]))
        _measured[key] = sizes
    return _measured[key]
