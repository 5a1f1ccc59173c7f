"""The training loop: pretraining and fine-tuning, one process or many (torch.distributed), resumable exactly.

Everything is configured by gin (`gin/runs/*.gin` bind the `%gin.REQUIRED` macros MIXTURE_OR_TASK_NAME,
TASK_FEATURE_LENGTHS, TRAIN_STEPS, MODEL_DIR, BATCH_SIZE, INITIAL_CHECKPOINT_PATH, as in t5x).

Steps are counted as t5x counts them: fine-tuning starts at the step of the checkpoint it restores and runs until
TRAIN_STEPS in total, so fine-tuning a 1,000-step pretrained model for 500 steps means TRAIN_STEPS = 1,500. The
optimizer state is reset for fine-tuning; restarting the same command resumes from the latest checkpoint in
MODEL_DIR, with the optimizer, the RNG states and the position in the data stream, so the run continues exactly as if
it had not stopped.

The loss is normalised per target token over the whole global batch: micro-batches (gradient accumulation) and
processes are summed first, then divided by the total loss weight.

An online-mixing run (`mixing.strategy = 'online'`) reads `online_stream.OnlineStream` instead of the tf.data
pipeline, and after each step hands the per-task losses to `online_mixing.OnlineMixer`, whose shares the next
step's batch is drawn by; the mixer's state is saved with each checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import gin
import numpy as np
import seqio
import torch
import torch.distributed as dist

from mtplatform import (
    accounting,
    cache,
    checkpoints,
    data,
    distill,
    evaluate,
    health,
    huggingface,
    interrupts,
    mixing,
    online_mixing,
    optim,
    run_lock,
    validation,
)
from mtplatform import model as model_lib
from mtplatform import precision as precision_lib
from mtplatform.distributed import Distributed, full_state, gradient_sync, load_optimizer, setup_distributed, wrap_model
from mtplatform.online_stream import OnlineStream
from mtplatform.tf_setup import configure_tensorflow


def vocab_size_for(mixture_or_task_name: str) -> int:
    """The task vocabulary's size rounded up to a multiple of 128 (as T5's 32,100 -> 32,128), for fast matmuls."""
    provider = seqio.get_mixture_or_task(mixture_or_task_name)
    size = provider.output_features["targets"].vocabulary.vocab_size
    return int(math.ceil(size / 128) * 128)


def vocabulary_of(mixture_or_task_name: str) -> dict:
    """What identifies the tasks' vocabulary: its size and the SHA-256 of its SentencePiece model (saved with each
    checkpoint, so that a run is never resumed with another vocabulary)."""
    vocab = seqio.get_mixture_or_task(mixture_or_task_name).output_features["targets"].vocabulary
    model = getattr(vocab, "sp_model", None)
    return {"size": vocab.vocab_size, "sha256": hashlib.sha256(model).hexdigest() if model else None}


def check_vocabulary(current: dict, saved: dict | None, model_ids: int, checkpoint: Path) -> None:
    """Refuse to resume `checkpoint` with a vocabulary other than its own (its ids would mean other pieces, and a
    larger one fails with an index error steps later). Checkpoints from before the fingerprint: the size only."""
    if current["size"] > model_ids or (saved is not None and saved != current):
        was = f"{saved['size']:,} ids, sha256 {str(saved['sha256'])[:12]}" if saved else f"up to {model_ids:,} ids"
        raise ValueError(f"the vocabulary (MTP_VOCAB or vocab_path.path) has {current['size']:,} ids, sha256 "
                         f"{str(current['sha256'])[:12]}; {checkpoint} was trained with {was}: resume with the run's "
                         "vocabulary, or use another MODEL_DIR")


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_initial_weights(path: str | Path, vocab_size: int,
                         setting: str = "INITIAL_CHECKPOINT_PATH") -> tuple[model_lib.T5, int]:
    """(model, step) from one of our checkpoints (or a model directory's latest) or a Hugging Face T5 directory;
    `setting` names where the path came from in an error."""
    path = Path(path)
    if huggingface.is_hf_directory(path):
        model, step = huggingface.load_hf(path), 0
    else:  # fine-tuning starts a fresh optimizer: the weights are all it reads
        weights, step = checkpoints.verified_weights(path, setting)
        model = checkpoints.load_model(weights)
    if model.cfg.vocab_size < vocab_size:
        raise ValueError(f"{setting}={path}: its vocabulary has {model.cfg.vocab_size} ids, "
                         f"the tasks' needs {vocab_size}")
    return model, step


class Logger:
    """The run's `metrics.jsonl` and TensorBoard scalars in MODEL_DIR (main process only). A run first drops what an
    interrupted attempt logged after the step it starts from (metrics.jsonl rows; TensorBoard's purge_step), so
    that each step is logged once."""

    def __init__(self, model_dir: Path, enabled: bool, resumed_at: int | None = None):
        self.enabled = enabled
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            path = checkpoints.metrics_file(model_dir)
            if resumed_at is not None and path.is_file():
                _truncate_jsonl(path, resumed_at)
            self._jsonl = open(path, "a", buffering=1)  # noqa: SIM115 (closed in close())
            self._tb = SummaryWriter(str(checkpoints.tensorboard_dir(model_dir)),
                                     purge_step=None if resumed_at is None else resumed_at + 1)

    def log(self, step: int, values: dict[str, float]) -> None:
        """One row of metrics.jsonl (a non-finite value, as a skipped step's loss, is `null`: JSON has no NaN)."""
        if not self.enabled:
            return
        row = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in values.items()}
        with checkpoints.no_space_named(self._jsonl.name, checkpoints.METRICS):
            self._jsonl.write(json.dumps({"step": step, **row}, allow_nan=False) + "\n")
        for k, v in values.items():
            self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the rows of `path` up to `last_step` (written to a temporary file, then renamed: atomic)."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a crash mid-write
    checkpoints.replace_text(path, "".join(kept))


class TaskMeter:
    """Per-task figures of a run: examples and target tokens seen (cumulative, over all processes) and the loss
    summed over each task's target tokens since the last log. Its state is saved with each checkpoint, so that a
    resumed run reports exactly what an uninterrupted one would."""

    def __init__(self, names: list[str], state: dict | None = None):
        self.names = names
        n = len(names) + 1  # id 0 is padding
        self.examples, self.tokens = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        self.window_loss, self.window_tokens = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        if state:
            for key in ("examples", "tokens", "window_loss", "window_tokens"):
                by_name = state[key]
                getattr(self, key)[1:] = torch.tensor([by_name.get(t, 0.0) for t in names], dtype=torch.float64)

    def step_counts(self, batch: dict[str, torch.Tensor], token_loss: torch.Tensor) -> torch.Tensor:
        """This process's (examples, tokens, loss sum) per task id in one micro-batch, stacked (3, n)."""
        positions = batch.get("decoder_positions")
        examples, tokens = data.count_by_task(batch[data.TASK_IDS].numpy(),
                                              None if positions is None else positions.numpy(), len(self.names))
        ids = batch[data.TASK_IDS].flatten().long()
        out = torch.zeros(3, len(self.names) + 1, dtype=torch.float64)
        out[0], out[1] = torch.from_numpy(examples), torch.from_numpy(tokens)
        out[2].index_add_(0, ids, token_loss.detach().flatten().double().cpu() * (ids > 0).double())
        return out

    def add(self, counts: torch.Tensor) -> None:
        """Add one step's (examples, tokens, loss sum), already summed over processes."""
        self.examples += counts[0]
        self.tokens += counts[1]
        self.window_tokens += counts[1]
        self.window_loss += counts[2]

    def log_values(self, new_window: bool = True) -> dict[str, float]:
        """Figures for metrics.jsonl; then a new loss window, if `new_window`."""
        values: dict[str, float] = {}
        for i, task in enumerate(self.names, start=1):
            values[f"task/{task}/examples"] = self.examples[i].item()
            values[f"task/{task}/target_tokens"] = self.tokens[i].item()
            if self.window_tokens[i] > 0:
                values[f"task/{task}/loss"] = (self.window_loss[i] / self.window_tokens[i]).item()
        if new_window:
            self.window_loss.zero_()
            self.window_tokens.zero_()
        return values

    def state(self) -> dict:
        return {key: {t: getattr(self, key)[i].item() for i, t in enumerate(self.names, start=1)}
                for key in ("examples", "tokens", "window_loss", "window_tokens")}


def task_weight_vector(names: list[str], weights: dict[str, float] | None) -> torch.Tensor | None:
    """Loss weight per task id (id 0, padding, weighs 0), or None when every task weighs 1."""
    if not weights:
        return None
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"train.task_loss_weights names {', '.join(unknown)}, not a task of this run "
                         f"({', '.join(names)})")
    for task, w in weights.items():
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"train.task_loss_weights[{task!r}] = {w!r}: weights must be finite and >= 0")
    return torch.tensor([0.0] + [float(weights.get(t, 1.0)) for t in names])


def loss_weights(batch: dict[str, torch.Tensor], task_weights: torch.Tensor | None) -> torch.Tensor:
    """Each target token's weight in the loss: the converter's (1, 0 for padding) times its task's weight."""
    if task_weights is None:
        return batch["decoder_loss_weights"]
    return batch["decoder_loss_weights"] * task_weights[batch[data.TASK_IDS].long()]


@dataclass
class Restored:
    """Where a run starts: the model, its step, and (when resuming) the optimizer, RNG and logging state."""

    model: model_lib.T5
    step: int
    source: str
    checkpoint: Path | None = None
    state: dict | None = None


FROM_SCRATCH = "from scratch"  # `Restored.source` of a fresh model (a student may then take its teacher's layers)


def restore_or_init(model_dir: Path, vocab_size: int, initial_checkpoint_path: str | None,
                    finetune: bool) -> Restored:
    """Resume MODEL_DIR's latest checkpoint, else start from INITIAL_CHECKPOINT_PATH, else from scratch."""
    resume = checkpoints.latest(model_dir)  # setup has set unreadable ones aside
    if resume is not None:
        model, state = checkpoints.read_train_state(resume)
        check_model_shape(model.cfg, str(resume))
        return Restored(model, state["step"], f"resuming from {resume}", resume, state)
    if initial_checkpoint_path:
        model, step = load_initial_weights(initial_checkpoint_path, vocab_size)
        check_model_shape(model.cfg, initial_checkpoint_path)
        return Restored(model, step, f"{'fine-tuning' if finetune else 'starting'} from {initial_checkpoint_path} "
                                     f"(step {step})")
    if finetune:
        raise ValueError("mtp finetune needs INITIAL_CHECKPOINT_PATH (a checkpoint or a Hugging Face T5 directory)")
    return Restored(model_lib.T5(model_lib.T5Config(vocab_size=vocab_size)), 0, FROM_SCRATCH)


SHAPE_FIELDS = ("d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                "relative_attention_num_buckets", "relative_attention_max_distance", "feed_forward",
                "tie_word_embeddings", "vocab_size")


def check_model_shape(cfg: model_lib.T5Config, source: str) -> None:
    """A restored model's shape comes from its checkpoint; a model gin file that binds a different shape is an
    error naming both, rather than silently ignored. Dropout and the norm's epsilon may differ (fine-tuning sets
    dropout with train.dropout_rate)."""
    differ = []
    for field in SHAPE_FIELDS:
        try:
            bound = gin.query_parameter(f"T5Config.{field}")
        except ValueError:  # not bound by any gin file: nothing to disagree with
            continue
        if bound != getattr(cfg, field):
            differ.append(f"T5Config.{field} = {bound!r} in gin, {getattr(cfg, field)!r} in the checkpoint")
    if differ:
        raise ValueError(f"the model gin settings do not match {source}: {'; '.join(differ)} (drop the model gin "
                         "file to keep the checkpoint's shape, or use another MODEL_DIR for a new model)")


def _check_settings(fsdp: bool, ctx: Distributed, eval_every: int) -> None:
    if fsdp and ctx.world == 1:
        raise ValueError("train.fsdp = True needs more than one process (start with torchrun --nproc_per_node=N)")
    if fsdp and eval_every:
        raise ValueError("train.eval_every is not supported with train.fsdp (evaluation decodes on one process); "
                         "evaluate the checkpoints with `mtp eval`")
    if fsdp and optim.make_optimizer_name() == "adafactor":
        raise ValueError("make_optimizer.name = 'adafactor' does not support FSDP's sharded (DTensor) parameters; "
                         "use 'adamw' or 'adamw_scale' with train.fsdp = True")


def run_rates(model_dir: Path, resuming: bool, mixture_or_task_name: str, task_feature_lengths: dict[str, int],
              budget_rows: float, pack: bool, packing: str, seed: int) -> mixing.Resolved:
    """The rates this run trains by, resolved once: those it began with (`mixture.json`, UniMax's measured budget
    included) when it resumes from a checkpoint, else resolved now (`data.resolve_rates`)."""
    recorded = checkpoints.read_mixture(model_dir) if resuming else None
    if recorded is None:
        return data.resolve_rates(mixture_or_task_name, task_feature_lengths, budget_rows, pack, packing, seed)
    resolved = mixing.Resolved.from_record(recorded)
    where = checkpoints.mixture_file(model_dir)
    if resolved.mixture != mixture_or_task_name:
        raise ValueError(f"{where}: this run trains on {resolved.mixture}, not {mixture_or_task_name}; resume it "
                         "with the mixture it began with, or use another MODEL_DIR")
    provider = seqio.get_mixture_or_task(mixture_or_task_name)
    if isinstance(provider, mixing.Mixture):
        now = mixing.settings_for(provider.declared).complete(mixture_or_task_name)
        if now.budget_examples is None:  # measured when the run began: not a setting that changed
            now = replace(now, budget_examples=resolved.settings.budget_examples)
        changed = [f"mixing.{k} = {v!r} now, {getattr(resolved.settings, k)!r} when it began"
                   for k, v in asdict(now).items() if v != getattr(resolved.settings, k)]
        if changed:
            raise ValueError(f"{where}: {mixture_or_task_name}'s rates would change on resume ({'; '.join(changed)});"
                             " resume with the settings the run began with, or use another MODEL_DIR")
    return resolved


def _config_text(resolved: mixing.Resolved) -> str:
    """The resolved gin config, with the tasks a mixture dropped for want of data as comments."""
    dropped = [f"# mixture {resolved.mixture}: dropped {task}: {why}\n" for task, why in resolved.dropped.items()]
    return "".join(dropped) + gin.config_str()


@gin.configurable("train", denylist=["finetune"])
@dataclass(frozen=True)
class RunConfig:
    """Every setting of a training run, bound by gin as `train.<field>` (the run gin files bind the required ones
    through their macros), validated when built, then frozen and passed down whole, as torchtune's recipe config.

    `dropout_rate`, when given, overrides the rate of a restored model (T5 fine-tunes with 0.1 what it pretrained
    without dropout); a fresh model takes its rate from `T5Config`. `fsdp` shards parameters, gradients and optimizer
    state over the processes (FSDP2) instead of replicating them (DDP), for models that do not fit one device;
    checkpoints are gathered to the same unsharded files either way. `task_loss_weights` ({task: weight}, 1 for
    tasks not named) weights each task's target tokens in the loss, which stays normalised by the total weight.
    `packing` is "first_fit" (`mtplatform.packing`) or "seqio" (seqio's next fit, which runs from before
    2026-11-26 used); a run resumes only with the packing its checkpoint was written with.

    A non-finite loss or gradient norm stops the run before the update (`max_nonfinite_skips` > 0 skips up to that
    many such updates in a row instead); a step loss above `loss_spike_factor` times its recent mean is reported
    (0: never). Feature lengths that would cut more than `max_truncated_share` of a task's examples are refused.
    A MODEL_DIR whose checkpoints are all unreadable is an error unless `start_over_if_unreadable`.
    `torch_compile` trains through `torch.compile` of the model; its first step, which compiles, is timed and
    reported (off by default: on CPUs the compile takes seconds to minutes that short runs do not earn back).
    A checkpoint is written every `checkpoint_every` steps, at each of `checkpoint_steps` (an experiment's
    evaluation points, counted from its stage's own start) and at the last step. `distillation`
    (`@distill.DistillConfig()`, gin/runs/distill.gin) trains the model as a student of a teacher checkpoint
    (`mtplatform.distill`). `finetune` is the command's (`mtp finetune`), not a gin setting.
    """

    model_dir: str = gin.REQUIRED
    mixture_or_task_name: str = gin.REQUIRED
    task_feature_lengths: dict[str, int] = gin.REQUIRED
    train_steps: int = gin.REQUIRED
    batch_size: int = gin.REQUIRED
    initial_checkpoint_path: str | None = None
    finetune: bool = False
    dropout_rate: float | None = None
    fsdp: bool = False
    grad_accum_steps: int = 1
    clip_grad_norm: float | None = 1.0
    precision: str = "auto"
    z_loss: float = 1e-4
    pack: bool = True
    packing: str = "first_fit"
    seed: int = 0
    task_loss_weights: dict[str, float] | None = None
    checkpoint_every: int = 1000
    checkpoint_steps: Sequence[int] = ()
    keep_checkpoints: int | None = 3
    log_every: int = 10
    eval_every: int = 0
    eval_num_examples: int | None = 256
    eval_max_decode_length: int = 32
    max_nonfinite_skips: int = 0
    loss_spike_factor: float = 3.0
    max_truncated_share: float = 0.9
    torch_compile: bool = False
    progress: bool = True
    start_over_if_unreadable: bool = False
    distillation: distill.DistillConfig | None = None

    def __post_init__(self) -> None:
        validation.check_train_settings(
            model_dir=self.model_dir, mixture_or_task_name=self.mixture_or_task_name, train_steps=self.train_steps,
            batch_size=self.batch_size, task_feature_lengths=self.task_feature_lengths,
            grad_accum_steps=self.grad_accum_steps, seed=self.seed, checkpoint_every=self.checkpoint_every,
            keep_checkpoints=self.keep_checkpoints, log_every=self.log_every, eval_every=self.eval_every,
            eval_num_examples=self.eval_num_examples, eval_max_decode_length=self.eval_max_decode_length,
            clip_grad_norm=self.clip_grad_norm, dropout_rate=self.dropout_rate, z_loss=self.z_loss,
            max_nonfinite_skips=self.max_nonfinite_skips, loss_spike_factor=self.loss_spike_factor,
            max_truncated_share=self.max_truncated_share)
        if not isinstance(self.torch_compile, bool):
            raise ValueError(f"train.torch_compile = {self.torch_compile!r}: must be True or False")
        if self.distillation is not None and not isinstance(self.distillation, distill.DistillConfig):
            raise ValueError(f"train.distillation = {self.distillation!r}: must be @distill.DistillConfig() or None")
        if self.distillation is not None and self.fsdp:
            raise ValueError("train.distillation with train.fsdp: the teacher would need sharding too; distil with "
                             "DDP (train.fsdp = False)")


@dataclass
class Run:
    """Everything a training run holds between steps (what `setup` builds and `train_step` and `save` use)."""

    config: RunConfig
    ctx: Distributed
    device: torch.device
    precision: str  # the config's, resolved for this device ("auto" -> bf16 or fp32)
    model: model_lib.T5
    wrapped: torch.nn.Module
    optimizer: torch.optim.Optimizer
    stream: data.BatchIterator | OnlineStream
    resolved: mixing.Resolved
    meter: TaskMeter
    task_weights: torch.Tensor | None
    step: int
    first_step: int  # where this run (not this attempt) began: UniMax's budget counts from there
    losses_since_log: list[float]
    config_text: str
    attempt: str  # names this attempt's temporary checkpoint directories
    spikes: health.SpikeDetector
    vocabulary: dict  # `vocabulary_of`, saved with each checkpoint
    skipped: int = 0  # consecutive updates skipped for a non-finite loss or gradient
    data_wait_s: float = 0.0  # seconds spent waiting for batches from the input pipeline
    compiling: bool = False  # torch.compile'd, first step not yet taken (its time is reported)
    healthy: bool = True  # no spike, skipped update or zero gradient since the last checkpoint
    mixer: online_mixing.OnlineMixer | None = None  # strategy 'online': the shares, moved by per-task losses
    reference: model_lib.T5 | None = None  # DoReMi's reference model (its per-token losses give the excess loss)
    distiller: distill.Distiller | None = None  # the teacher, for a student (`train.distillation`)
    terms: distill.TermMeter | None = None  # the distillation loss's terms since the last log

    @property
    def model_dir(self) -> Path:
        return Path(self.config.model_dir)


def setup(config: RunConfig, per_rank: int, ctx: Distributed, device: torch.device) -> Run:
    """Model, optimizer and data stream, from MODEL_DIR's latest checkpoint (exactly where it stopped), an initial
    checkpoint, or scratch; writes config.gin and mixture.json."""
    c, model_dir = config, Path(config.model_dir)
    torch.manual_seed(c.seed)  # the same initial weights on every process (FSDP shards them without a broadcast)
    if ctx.main:
        # Verifies checksums; moves an unreadable checkpoint aside, saying so.
        checkpoints.latest_readable(model_dir, start_over=c.start_over_if_unreadable)
    ctx.barrier()
    vocabulary = vocabulary_of(c.mixture_or_task_name)
    start = restore_or_init(model_dir, vocab_size_for(c.mixture_or_task_name), c.initial_checkpoint_path,
                            c.finetune)
    model, state = start.model, start.state or {}
    if start.checkpoint is not None:
        check_vocabulary(vocabulary, state.get("vocabulary"), model.cfg.vocab_size, start.checkpoint)
    first_step = state.get("first_step", start.step)
    distiller = None
    if c.distillation is not None:
        distiller, start = _distiller(c.distillation, start, vocabulary)
    if c.dropout_rate is not None:
        model.set_dropout(c.dropout_rate)
    model.to(device).train()
    wrapped = wrap_model(model, c.fsdp)
    torch.manual_seed(c.seed + ctx.rank)  # dropout masks differ between processes
    optimizer = optim.make_optimizer([*model.parameters(), *(distiller.to(device).parameters() if distiller else [])])
    if "optimizer" in state:
        load_optimizer(model, optimizer, state["optimizer"], c.fsdp)

    resolved = run_rates(model_dir, start.checkpoint is not None, c.mixture_or_task_name, c.task_feature_lengths,
                         (c.train_steps - first_step) * c.batch_size, c.pack, c.packing, c.seed)
    if ctx.main:
        validation.check_lengths_fit(list(resolved.rates), c.task_feature_lengths, c.max_truncated_share)
    mixer = reference = None
    if resolved.settings.strategy == "online":  # before the stream: a bad reference is refused at once
        mixer, reference = _online_mixer(resolved, state.get("online_mixer"), model, vocabulary, device)
    stream = _stream(c, resolved, per_rank, ctx)
    if mixer is not None:
        stream.set_shares(mixer.shares)
    if start.checkpoint is not None:
        stream.restore(checkpoints.data_state_dir(start.checkpoint, ctx.rank))
        rng = state["rng"]
        if isinstance(rng, list) and len(rng) != ctx.world:
            raise ValueError(f"{start.checkpoint} was written by {len(rng)} processes; resume it with as many, "
                             f"not {ctx.world}")
        _set_rng_state(rng[ctx.rank] if isinstance(rng, list) else rng)
    names = list(resolved.rates)
    run = Run(config=c, ctx=ctx, device=device, precision=precision_lib.resolve(c.precision, device), model=model,
              wrapped=wrapped, optimizer=optimizer, stream=stream, resolved=resolved,
              meter=TaskMeter(names, state.get("tasks")), task_weights=task_weight_vector(names, c.task_loss_weights),
              step=start.step, first_step=first_step, losses_since_log=list(state.get("losses_since_log", [])),
              config_text=_config_text(resolved), attempt=_attempt(ctx),
              spikes=health.SpikeDetector(c.loss_spike_factor, history=state.get("recent_losses")),
              vocabulary=vocabulary, mixer=mixer, reference=reference, distiller=distiller,
              terms=distill.TermMeter(bool(c.distillation.hidden), state.get("distill_terms") if ctx.main else None)
              if distiller else None)  # the saved sums are over processes: the main process carries them on
    if ctx.main:
        checkpoints.write_run_files(model_dir, run.config_text, resolved.record())
        for task, why in resolved.dropped.items():
            print(f"mtp: mixture {resolved.mixture}: dropped {task} ({why})", file=sys.stderr)
        for task in names:
            if where := cache.where_cached(seqio.get_mixture_or_task(task)):
                print(f"mtp: {task}: reading seqio's cache in {where}", file=sys.stderr)
        print(f"mtp: {accounting.describe(model)}, {run.precision}, {ctx.world} process(es), global batch "
              f"{c.batch_size} ({per_rank} x {c.batch_size // per_rank // ctx.world} accumulation per process); "
              f"{start.source}", file=sys.stderr)
    return run


def _distiller(config: distill.DistillConfig, start: Restored,
               vocabulary: dict) -> tuple[distill.Distiller, Restored]:
    """The teacher and its learned projections (their saved state when resuming); a student from scratch under
    `student_init = "teacher_layers"` first takes the teacher's layers (DistilBERT)."""
    teacher = frozen_model(config.teacher, "distill.teacher", start.model.cfg.vocab_size, vocabulary)
    if start.source == FROM_SCRATCH and config.student_init == "teacher_layers":
        distill.init_from_teacher(start.model, teacher)
        start = replace(start, source=f"from every other layer of the teacher {config.teacher}")
    distiller = distill.Distiller(config, teacher, start.model)
    if start.state and "distiller" in start.state:
        distiller.load_state_dict(start.state["distiller"])
    return distiller, start


def _stream(c: RunConfig, resolved: mixing.Resolved, per_rank: int,
            ctx: Distributed) -> data.BatchIterator | OnlineStream:
    """This process's batches: tf.data's pipeline at fixed rates, or the online stream whose shares can change."""
    if resolved.settings.strategy == "online":
        return OnlineStream(list(resolved.rates), c.mixture_or_task_name, c.task_feature_lengths, per_rank, c.pack,
                            c.seed, ctx.rank, ctx.world)
    dataset, _ = data.train_dataset(
        mixture_or_task_name=c.mixture_or_task_name, task_feature_lengths=c.task_feature_lengths,
        batch_size=per_rank, pack=c.pack, packing=c.packing, seed=c.seed, shard_index=ctx.rank, num_shards=ctx.world,
        resolved=resolved)
    return data.BatchIterator(dataset, packing=c.packing if c.pack else data.UNPACKED)


def _online_mixer(resolved: mixing.Resolved, state: dict | None, model: model_lib.T5, vocabulary: dict,
                  device: torch.device) -> tuple[online_mixing.OnlineMixer, model_lib.T5 | None]:
    """An online run's mixer (its saved state when resuming) and, for DoReMi, its reference model."""
    settings = online_mixing.OnlineSettings(**resolved.settings.online)
    settings.check(resolved.mixture, mixing.FIXED_STRATEGIES, len(resolved.rates))
    mixer = online_mixing.OnlineMixer(settings, list(resolved.rates), resolved.shares, state)
    if not mixer.needs_reference:
        return mixer, None
    return mixer, reference_model(settings.reference, model, vocabulary).to(device).eval()


def reference_model(path: str, model: model_lib.T5, vocabulary: dict) -> model_lib.T5:
    """DoReMi's reference: a checkpoint of a model of this run's shapes and vocabulary (a one-line error else)."""
    setting = "mixing.online.reference"
    reference = frozen_model(path, setting, model.cfg.vocab_size, vocabulary)
    differ = [f"{f} {getattr(reference.cfg, f)!r} (this run's {getattr(model.cfg, f)!r})" for f in SHAPE_FIELDS
              if getattr(reference.cfg, f) != getattr(model.cfg, f)]
    if differ:
        raise ValueError(f"{setting}={path}: the reference is another model: {'; '.join(differ)}")
    return reference


def frozen_model(path: str, setting: str, vocab_size: int, vocabulary: dict) -> model_lib.T5:
    """A model that guides this run without training (DoReMi's reference, a distillation's teacher), in eval mode
    and without gradients: a checkpoint (or model directory) of this run's vocabulary, or a Hugging Face T5."""
    if not Path(path).exists():
        raise ValueError(f"{setting}={path}: no such checkpoint or model directory")
    model, _ = load_initial_weights(path, vocab_size, setting)
    saved = None if huggingface.is_hf_directory(Path(path)) else checkpoints.read_vocabulary(path)
    if saved is not None and saved != vocabulary:
        raise ValueError(f"{setting}={path}: it was trained with another vocabulary ({saved['size']:,} ids, sha256 "
                         f"{str(saved['sha256'])[:12]}; this run's: {vocabulary['size']:,} ids, sha256 "
                         f"{str(vocabulary['sha256'])[:12]})")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _attempt(ctx: Distributed) -> str:
    """A name for this attempt, the same on every process."""
    token = [f"{os.getpid()}-{os.urandom(3).hex()}"]
    if ctx.world > 1:
        dist.broadcast_object_list(token, src=0)
    return token[0]


def train_step(run: Run, lr: float) -> tuple[float, float, int]:
    """One optimizer step over `grad_accum_steps` micro-batches: (loss, gradient norm, non-padding tokens).
    A non-finite loss or gradient norm stops the run before the update (or skips it: `health.check_step`)."""
    ctx, device, c = run.ctx, run.device, run.config
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    waited = time.perf_counter()
    micro = [next(run.stream) for _ in range(c.grad_accum_steps)]
    run.data_wait_s += time.perf_counter() - waited
    weights = [loss_weights(b, run.task_weights) for b in micro]
    total_weight = ctx.sum(sum(w.sum().item() for w in weights))
    loss_sum, tokens = 0.0, 0
    counts = torch.zeros(4, len(run.meter.names) + 1, dtype=torch.float64)  # TaskMeter's 3, and excess loss
    for i, cpu_batch in enumerate(micro):
        batch = {k: v.to(device, non_blocking=True) for k, v in cpu_batch.items()}
        sync = gradient_sync(run.wrapped, c.fsdp, enabled=i == len(micro) - 1)
        with sync, precision_lib.autocast(run.precision, device):
            token_loss, loss = _micro_batch_loss(run, batch, weights[i].to(device))
            # DDP and FSDP average gradients over processes; scale so that the result is the gradient of
            # (sum of token losses) / (total weight) over the global batch.
            (loss * ctx.world / max(total_weight, 1.0)).backward()
        loss_sum += loss.item()
        counts[:3] += run.meter.step_counts(cpu_batch, token_loss)
        if run.reference is not None:
            counts[3] += _excess_loss(run, batch, token_loss)
        tokens += int(sum((cpu_batch[k] != 0).sum().item() for k in ("encoder_input_tokens",
                                                                      "decoder_target_tokens")))
    counts = ctx.sum_tensor(counts)
    run.meter.add(counts)
    _move_shares(run, counts)
    if run.distiller is not None and ctx.world > 1:  # DDP averages the student's gradients, not the projections'
        for p in run.distiller.parameters():
            p.grad = ctx.sum_tensor(p.grad.cpu()).to(p.grad.device) / ctx.world
    norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), c.clip_grad_norm or math.inf)
    grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # DTensor under FSDP
    loss = ctx.sum(loss_sum) / max(total_weight, 1.0)
    if health.check_step(run.step + 1, loss, grad_norm, run.skipped, c.max_nonfinite_skips,
                         lambda: checkpoints.latest(run.model_dir)):
        run.optimizer.step()
        run.skipped = 0
    else:
        run.skipped += 1
        run.healthy = False
    run.optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, tokens


def _micro_batch_loss(run: Run, batch: dict[str, torch.Tensor],
                      weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(each target token's cross-entropy, the micro-batch's weighted loss sum): the model's own loss, or a
    student's distillation loss (`distill.Distiller`), whose terms `run.terms` adds up for the log."""
    if run.distiller is None:
        token_loss, _ = run.model.token_losses(batch, z_loss=run.config.z_loss, forward=run.wrapped)
        return token_loss, (token_loss * weights).sum()
    losses = run.distiller.token_losses(run.model, batch, run.config.z_loss, forward=run.wrapped)
    run.terms.add(losses, weights)
    return losses.cross_entropy, losses.weighted_sum(weights)


def _move_shares(run: Run, counts: torch.Tensor) -> None:
    """An online run: the step's per-task sums over processes (loss, target tokens, excess loss) move the shares,
    and the next step's batch is drawn by them (every process computes the same shares from the same sums)."""
    if run.mixer is None:
        return
    excess = counts[3, 1:].numpy() if run.reference is not None else None
    if run.mixer.observe(run.step + 1, counts[2, 1:].numpy(), counts[1, 1:].numpy(), excess):
        run.stream.set_shares(run.mixer.shares)


def _excess_loss(run: Run, batch: dict[str, torch.Tensor], token_loss: torch.Tensor) -> torch.Tensor:
    """DoReMi's excess loss of one micro-batch, summed per task id: max(loss - reference loss, 0) over each target
    token (the same z-loss on both sides)."""
    with torch.no_grad(), precision_lib.autocast(run.precision, run.device):
        reference_loss, _ = run.reference.token_losses(batch, z_loss=run.config.z_loss)
    ids = batch[data.TASK_IDS].flatten().long().cpu()
    excess = (token_loss.detach().float() - reference_loss.float()).clamp_min(0.0).flatten().double().cpu()
    out = torch.zeros(len(run.meter.names) + 1, dtype=torch.float64)
    return out.index_add_(0, ids, excess * (ids > 0).double())


def save(run: Run) -> None:
    """Checkpoint `run` at its step: written under a temporary name by all processes, renamed by the main one."""
    ctx, at_step = run.ctx, run.step
    model_state, optimizer_state = full_state(run.model, run.optimizer, run.config.fsdp)
    if ctx.main:  # refuse before anything is written: no checkpoint ever holds a NaN
        health.check_finite_state(at_step, model_state, "weight")
        health.check_finite_state(at_step, health.optimizer_tensors(optimizer_state), "optimizer state")
    tmp = checkpoints.temporary_dir(run.model_dir, at_step, run.attempt)
    needed = sum(t.nbytes for t in [*model_state.values(), *health.optimizer_tensors(optimizer_state).values()]
                 if isinstance(t, torch.Tensor))
    try:
        with checkpoints.no_space_named(tmp, f"the checkpoint of step {at_step}", needed):
            _write_checkpoint(run, tmp, model_state, optimizer_state)
    except BaseException as e:
        if ctx.main:  # a partial checkpoint would hold the space a rerun needs; the previous one stays
            checkpoints.discard(tmp)
        if isinstance(e, checkpoints.DiskFull):
            kept = checkpoints.latest(run.model_dir)
            raise checkpoints.DiskFull(f"{e}; removed the partial checkpoint, "
                                       f"{f'kept {kept.name}' if kept else 'no earlier checkpoint to keep'}") from None
        raise
    run.healthy = True
    ctx.barrier()


def _write_checkpoint(run: Run, tmp: Path, model_state: dict, optimizer_state: dict) -> None:
    """All processes write `tmp` (each its data iterator; the main one the rest), the main one seals it."""
    ctx, at_step = run.ctx, run.step
    if ctx.main:
        tmp.mkdir(parents=True)
    ctx.barrier()
    run.stream.save(checkpoints.data_state_dir(tmp, ctx.rank))
    rng = _gather_rng(ctx)
    terms = {k: ctx.sum(v) for k, v in run.terms.sums.items()} if run.terms is not None else None
    if ctx.main:
        checkpoints.write_train_state(tmp, run.model, model_state, {
            "step": at_step, "optimizer": optimizer_state, "rng": rng, "tasks": run.meter.state(),
            "losses_since_log": run.losses_since_log, "first_step": run.first_step,
            "recent_losses": list(run.spikes.recent), "vocabulary": run.vocabulary,
            **({"online_mixer": run.mixer.state()} if run.mixer is not None else {}),
            **({"distiller": run.distiller.state_dict(), "distill_terms": terms}
               if run.distiller is not None else {})}, run.config_text)
        recent = list(run.spikes.recent)[-10:]
        checkpoints.finish(tmp, run.model_dir, at_step, ctx.world, sum(recent) / len(recent) if recent else None,
                           run.healthy, run.config.keep_checkpoints, run.attempt)


def train(config: RunConfig | None = None, /, **fields: Any) -> dict:
    """Train until `train_steps` (resuming from MODEL_DIR if it holds a checkpoint); return the last logged values.

    `config` is the run's settings (`RunConfig`); without it, `fields` and gin's `train.*` bindings build it. One run
    writes a MODEL_DIR at a time (`run_lock`); SIGTERM or SIGINT checkpoints and stops (`interrupts.Stopped`).
    """
    config = config if config is not None else RunConfig(**fields)
    configure_tensorflow()  # before the input pipeline's first op; a no-op when the CLI already did it
    mixing.register_declared()
    ctx, device = setup_distributed()
    model_dir = Path(config.model_dir)
    per_rank, rest = divmod(config.batch_size, ctx.world * config.grad_accum_steps)
    if rest or per_rank == 0:
        raise ValueError(f"BATCH_SIZE={config.batch_size} must be a multiple of processes ({ctx.world}) x "
                         f"grad_accum_steps ({config.grad_accum_steps})")
    validation.check_micro_batch(config.batch_size, per_rank, config.task_feature_lengths)
    optim.check_settings(config.train_steps)
    model_dir.mkdir(parents=True, exist_ok=True)
    _check_settings(config.fsdp, ctx, config.eval_every)
    with run_lock.hold(model_dir, enabled=ctx.main):
        run = setup(config, per_rank, ctx, device)  # a signal now exits at once (`interrupts.exit_at_once`)
        if config.torch_compile:
            run.wrapped, run.compiling = torch.compile(run.wrapped), True
        logger = Logger(model_dir, ctx.main, resumed_at=run.step)
        try:
            # from here a signal checkpoints first; evaluations reuse the tasks' examples
            with interrupts.StopRequests() as stops, evaluate.reusing_evaluators():
                last = _loop(run, logger, stops)
        finally:
            logger.close()
    if not last and ctx.main:
        print(f"mtp: {model_dir} is already at step {run.step} >= TRAIN_STEPS; nothing to do", file=sys.stderr)
    return {"step": run.step, "model_dir": str(model_dir), **last}


def _loop(run: Run, logger: Logger, stops: interrupts.StopRequests) -> dict[str, float]:
    """Steps until `train_steps`, logging, evaluating and checkpointing on their intervals; the last logged values."""
    ctx, c = run.ctx, run.config
    lengths = dict(c.task_feature_lengths)
    example_flops = accounting.training_flops(run.model.cfg, lengths.get("inputs", 0), lengths["targets"])
    checkpoint_steps = frozenset(c.checkpoint_steps)
    bar = None
    if ctx.main and c.progress:
        from tqdm import tqdm

        bar = tqdm(total=c.train_steps, initial=run.step, desc="train", unit="step", dynamic_ncols=True,
                   file=sys.stderr)
    try:
        return _steps(run, logger, stops, bar, example_flops, checkpoint_steps)
    finally:
        if bar is not None:  # also on an error: its message then starts on a line of its own
            bar.close()


def _steps(run: Run, logger: Logger, stops: interrupts.StopRequests, bar, example_flops: float,
           checkpoint_steps: frozenset[int]) -> dict[str, float]:
    """The training loop proper (see `_loop`)."""
    ctx, c = run.ctx, run.config
    last: dict[str, float] = {}
    window = _Window()
    while run.step < c.train_steps:
        lr = optim.learning_rate(run.step, c.train_steps)
        began = time.perf_counter()
        step_loss, grad_norm, tokens = train_step(run, lr)
        if run.compiling:
            run.compiling = False
            if ctx.main:
                print(f"mtp: torch.compile: the first step took {time.perf_counter() - began:.1f} s (compiling)",
                      file=sys.stderr)
        run.step += 1
        window.tokens += tokens
        _observe_health(run, step_loss, grad_norm)
        window_ends = run.step % c.log_every == 0
        if window_ends or run.step == c.train_steps:
            # A run's last step is logged too; its window goes on (and is saved) unless it ends there, so that a
            # resumed run logs what an uninterrupted one would.
            last = window.values(run, lr, grad_norm, example_flops * c.batch_size, window_ends)
            logger.log(run.step, last)
        if bar is not None:
            bar.update(1)
            # The step's own loss (metrics.jsonl logs the window's mean); throughput once a window has measured it.
            measured = ({"window_tok_s": f"{window.tokens_per_second:.0f}",
                         "data_wait": f"{window.data_wait_fraction:.1%}"} if window.tokens_per_second else {})
            bar.set_postfix(step_loss=f"{step_loss:.4f}", **measured, refresh=False)
        if c.eval_every and run.step % c.eval_every == 0:
            _evaluate_and_log(run, logger)
        stop = _stop_requested(stops, ctx)
        if run.step % c.checkpoint_every == 0 or run.step in checkpoint_steps or run.step == c.train_steps or stop:
            save(run)
        if stop and run.step < c.train_steps:  # on the last step the run is simply done
            raise interrupts.Stopped(stop, f"stopped by {signal.Signals(stop).name} at step {run.step}; wrote "
                                           f"{checkpoints.checkpoint_dir(run.model_dir, run.step)}; run the same "
                                           "command again to resume")
    return last


class _Window:
    """Throughput over the current logging window, and the share of its time spent waiting for batches (the input
    pipeline should never be the bottleneck: `data_wait_fraction` in metrics.jsonl and the progress bar)."""

    def __init__(self) -> None:
        self.tokens, self.start, self.tokens_per_second, self.data_wait_fraction = 0, time.perf_counter(), 0.0, 0.0
        self.wait_at_start = 0.0  # Run.data_wait_s when the window began

    def values(self, run: Run, lr: float, grad_norm: float, flops_per_step: float, ends: bool) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        self.tokens_per_second = run.ctx.sum(self.tokens) / elapsed
        self.data_wait_fraction = (run.data_wait_s - self.wait_at_start) / elapsed
        steps = len(run.losses_since_log)
        values = {"loss": sum(run.losses_since_log) / steps} if steps else {}  # none: every update was skipped
        values.update({"learning_rate": lr, "grad_norm": grad_norm, "tokens_per_second": self.tokens_per_second,
                       "flops_per_second": flops_per_step * steps / elapsed,
                       "data_wait_fraction": self.data_wait_fraction, **run.meter.log_values(new_window=ends),
                       **(run.mixer.log_values() if run.mixer is not None else {})})
        if run.terms is not None:
            summed = {k: run.ctx.sum(v) for k, v in run.terms.sums.items()}
            values.update(run.terms.log_values(summed, new_window=ends))
        if ends:
            self.tokens, self.start, run.losses_since_log = 0, time.perf_counter(), []
            self.wait_at_start = run.data_wait_s
        return values


def _observe_health(run: Run, loss: float, grad_norm: float) -> None:
    """Record a finite step's loss; a spike, a skipped update or a zero gradient marks the next checkpoint
    unhealthy (pruning keeps the newest healthy one)."""
    if not math.isfinite(loss):
        return  # a skipped update (health.check_step said so already)
    run.losses_since_log.append(loss)
    if run.spikes.observe(run.step, loss):
        run.healthy = False
    if grad_norm == 0.0:
        print(f"mtp: step {run.step}: the gradient is exactly zero (loss {loss:.4f})", file=sys.stderr)
        run.healthy = False


def _stop_requested(stops: interrupts.StopRequests, ctx: Distributed) -> int:
    """The signal to stop on, or 0; every process stops when any one was signalled (at the same step)."""
    signum = stops.signum or 0
    if ctx.world > 1 and ctx.sum(float(signum > 0)) > 0:
        return signum or int(signal.SIGTERM)
    return signum


def _gather_rng(ctx: Distributed) -> list | dict:
    state = _rng_state()
    if ctx.world == 1:
        return state
    gathered: list = [None] * ctx.world
    dist.all_gather_object(gathered, state)
    return gathered


def _evaluate_and_log(run: Run, logger: Logger) -> None:
    c = run.config
    if run.ctx.main:
        metrics = evaluate.evaluate(run.model, c.mixture_or_task_name, task_feature_lengths=c.task_feature_lengths,
                                    num_examples=c.eval_num_examples, max_decode_length=c.eval_max_decode_length,
                                    precision=run.precision, device=run.device, step=run.step)
        logger.log(run.step, {f"eval/{task}/{k}": v for task, m in metrics.items() for k, v in m.items()})
    run.ctx.barrier()
