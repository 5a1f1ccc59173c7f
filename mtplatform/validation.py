"""Training settings checked before any work, each error one line naming the setting (and the task) at fault.

Without these, a bad setting surfaces late and far from its cause: `TRAIN_STEPS=0` trains nothing and exits 0,
a targets length of 0 crashes TensorFlow, `checkpoint_every=0` divides by zero after the first step, and lengths of
2 silently cut every example to nothing.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping

import seqio

from mtplatform import mixing, settings

SAMPLE = 200  # training examples per task measured against the feature lengths
WARN_CUT_SHARE = 0.1  # more than this share of a task's examples cut by a length is reported


def positive_int(name: str, value: object, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} = {value!r}: must be a whole number >= 1" + (" (or None)" if allow_none else ""))


def non_negative_number(name: str, value: object, allow_none: bool = False, below: float | None = None) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0 \
            or (below is not None and value >= below):
        bound = f" and < {below}" if below is not None else ""
        raise ValueError(f"{name} = {value!r}: must be a finite number >= 0{bound}" + (" (or None)" if allow_none
                                                                                       else ""))


def check_train_settings(*, train_steps, batch_size, task_feature_lengths, grad_accum_steps, checkpoint_every,
                         keep_checkpoints, log_every, eval_every, clip_grad_norm, dropout_rate, z_loss,
                         max_nonfinite_skips, loss_spike_factor, max_truncated_share) -> None:
    """Every scalar setting of `train` has a type and a range; the first one outside them is the error."""
    positive_int("TRAIN_STEPS (train.train_steps)", train_steps)
    positive_int("BATCH_SIZE (train.batch_size)", batch_size)
    positive_int("train.grad_accum_steps", grad_accum_steps)
    positive_int("train.checkpoint_every", checkpoint_every)
    positive_int("train.keep_checkpoints", keep_checkpoints, allow_none=True)
    positive_int("train.log_every", log_every)
    non_negative_number("train.eval_every", eval_every)
    non_negative_number("train.clip_grad_norm", clip_grad_norm, allow_none=True)
    non_negative_number("train.dropout_rate", dropout_rate, allow_none=True, below=1)
    non_negative_number("train.z_loss", z_loss)
    non_negative_number("train.max_nonfinite_skips", max_nonfinite_skips)
    non_negative_number("train.loss_spike_factor", loss_spike_factor)
    non_negative_number("train.max_truncated_share", max_truncated_share)
    if not isinstance(task_feature_lengths, Mapping) or "targets" not in task_feature_lengths:
        raise ValueError(f"TASK_FEATURE_LENGTHS = {task_feature_lengths!r}: must be a dict with a 'targets' length "
                         "(and 'inputs' for encoder-decoder tasks), as {'inputs': 512, 'targets': 114}")
    for feature, length in task_feature_lengths.items():
        positive_int(f"TASK_FEATURE_LENGTHS[{feature!r}]", length)


def check_lengths_fit(task_names: list[str], lengths: Mapping[str, int], max_share: float) -> None:
    """Refuse lengths that would cut more than `max_share` of a supervised task's examples, and report any that cut
    more than WARN_CUT_SHARE (T5 truncates by design; a length of 2 that cuts everything is a mistake). Measured on
    each task's first SAMPLE training examples, tokenized, EOS included; unsupervised objectives build their
    examples to fit the lengths."""
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
        task = seqio.get_mixture_or_task(name)
        ds = task.get_dataset(None, split="train", shuffle=False, use_cached=False).take(SAMPLE)
        sizes: dict[str, list[int]] = {f: [] for f in task.output_features}
        for ex in ds.as_numpy_iterator():
            for feature, seen in sizes.items():
                if feature in ex:
                    seen.append(len(ex[feature]))
        _measured[key] = sizes
    return _measured[key]
