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
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import gin
import numpy as np
import seqio
import torch
import torch.distributed as dist

from mtplatform import checkpoints, data, evaluate, optim
from mtplatform import model as model_lib
from mtplatform import precision as precision_lib
from mtplatform.tf_setup import configure_tensorflow


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item()


def setup_distributed() -> tuple[Distributed, torch.device]:
    """Join the process group when started by torchrun (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Distributed(rank, world, local), device


def wrap_model(model: model_lib.T5, ctx: Distributed, fsdp: bool) -> torch.nn.Module:
    """The module to run forward through: the model itself, DDP over it, or the model sharded in place by FSDP2
    (`fully_shard` per encoder/decoder block, then the root), whose parameters then become DTensor shards."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in [*model.encoder, *model.decoder]:
            fully_shard(block)
        fully_shard(model)
        return model
    if ctx.world > 1:
        return torch.nn.parallel.DistributedDataParallel(model)
    return model


def gradient_sync(wrapped: torch.nn.Module, ctx: Distributed, fsdp: bool, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if fsdp:
        wrapped.set_requires_gradient_sync(enabled)
        return nullcontext()
    if ctx.world > 1 and not enabled:
        return wrapped.no_sync()
    return nullcontext()


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts (a collective under FSDP: every process must call it)."""
    if not fsdp:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, fsdp: bool) -> None:
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def vocab_size_for(mixture_or_task_name: str) -> int:
    """The task vocabulary's size rounded up to a multiple of 128 (as T5's 32,100 -> 32,128), for fast matmuls."""
    provider = seqio.get_mixture_or_task(mixture_or_task_name)
    size = provider.output_features["targets"].vocabulary.vocab_size
    return int(math.ceil(size / 128) * 128)


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


def load_initial_weights(path: str | Path, vocab_size: int) -> tuple[model_lib.T5, int]:
    """(model, step) from one of our checkpoints (or a model directory's latest) or a Hugging Face T5 directory."""
    path = Path(path)
    if (path / "config.json").is_file():  # Hugging Face layout; our checkpoints have meta.json and config.gin
        model, step = model_lib.load_hf(path), 0
    else:
        ckpt = checkpoints.resolve(path)
        model = model_lib.load(ckpt / "model.safetensors")
        step = json.loads((ckpt / "meta.json").read_text())["step"]
    if model.cfg.vocab_size < vocab_size:
        raise ValueError(f"INITIAL_CHECKPOINT_PATH={path}: its vocabulary has {model.cfg.vocab_size} ids, "
                         f"the tasks' needs {vocab_size}")
    return model, step


class Logger:
    """metrics.jsonl and TensorBoard scalars in MODEL_DIR (main process only)."""

    def __init__(self, model_dir: Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._jsonl = open(model_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 (closed in close())
            self._tb = SummaryWriter(str(model_dir / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        for k, v in values.items():
            self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


@gin.configurable(denylist=["finetune"])
def train(
    model_dir: str = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: dict[str, int] = gin.REQUIRED,
    train_steps: int = gin.REQUIRED,
    batch_size: int = gin.REQUIRED,
    initial_checkpoint_path: str | None = None,
    finetune: bool = False,
    dropout_rate: float | None = None,
    fsdp: bool = False,
    grad_accum_steps: int = 1,
    clip_grad_norm: float | None = 1.0,
    precision: str = "auto",
    z_loss: float = 1e-4,
    pack: bool = True,
    seed: int = 0,
    checkpoint_every: int = 1000,
    keep_checkpoints: int | None = 3,
    log_every: int = 10,
    eval_every: int = 0,
    eval_num_examples: int | None = 256,
    eval_max_decode_length: int = 32,
    progress: bool = True,
) -> dict:
    """Train until `train_steps` (resuming from MODEL_DIR if it holds a checkpoint); return the last logged values.

    `dropout_rate`, when given, overrides the rate of a restored model (T5 fine-tunes with 0.1 what it pretrained
    without dropout); a fresh model takes its rate from `T5Config`. `fsdp` shards parameters, gradients and optimizer
    state over the processes (FSDP2) instead of replicating them (DDP), for models that do not fit one device;
    checkpoints are gathered to the same unsharded files either way.
    """
    configure_tensorflow()  # before the input pipeline's first op; a no-op when the CLI already did it
    ctx, device = setup_distributed()
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    precision = precision_lib.resolve(precision, device)
    per_rank, rest = divmod(batch_size, ctx.world * grad_accum_steps)
    if rest or per_rank == 0:
        raise ValueError(f"BATCH_SIZE={batch_size} must be a multiple of processes ({ctx.world}) x "
                         f"grad_accum_steps ({grad_accum_steps})")
    vocab_size = vocab_size_for(mixture_or_task_name)
    torch.manual_seed(seed)  # the same initial weights on every process (FSDP shards them without a broadcast)

    resume = checkpoints.latest(model_dir)
    optimizer_state = None
    if resume is not None:
        model = model_lib.load(resume / "model.safetensors")
        state = torch.load(resume / "train_state.pt", map_location="cpu", weights_only=False)
        step, optimizer_state = state["step"], state["optimizer"]
        source = f"resuming from {resume}"
    elif initial_checkpoint_path:
        model, step = load_initial_weights(initial_checkpoint_path, vocab_size)
        source = f"{'fine-tuning' if finetune else 'starting'} from {initial_checkpoint_path} (step {step})"
    elif finetune:
        raise ValueError("mtp finetune needs INITIAL_CHECKPOINT_PATH (a checkpoint or a Hugging Face T5 directory)")
    else:
        model, step = model_lib.T5(model_lib.T5Config(vocab_size=vocab_size)), 0
        source = "from scratch"
    if dropout_rate is not None:
        model.set_dropout(dropout_rate)
    model.to(device).train()
    if fsdp and ctx.world == 1:
        raise ValueError("train.fsdp = True needs more than one process (start with torchrun --nproc_per_node=N)")
    if fsdp and eval_every:
        raise ValueError("train.eval_every is not supported with train.fsdp (evaluation decodes on one process); "
                         "evaluate the checkpoints with `mtp eval`")
    if fsdp and optim.make_optimizer_name() == "adafactor":
        raise ValueError("make_optimizer.name = 'adafactor' does not support FSDP's sharded (DTensor) parameters; "
                         "use 'adamw' or 'adamw_scale' with train.fsdp = True")
    wrapped = wrap_model(model, ctx, fsdp)
    torch.manual_seed(seed + ctx.rank)  # dropout masks differ between processes
    optimizer = optim.make_optimizer(model.parameters())
    if optimizer_state is not None:
        load_optimizer(model, optimizer, optimizer_state, fsdp)

    stream = data.BatchIterator(data.train_dataset(
        mixture_or_task_name=mixture_or_task_name, task_feature_lengths=task_feature_lengths,
        batch_size=per_rank, pack=pack, seed=seed, shard_index=ctx.rank, num_shards=ctx.world))
    if resume is not None:
        stream.restore(resume / f"data_rank{ctx.rank}")
        rng = state["rng"]
        if isinstance(rng, list) and len(rng) != ctx.world:
            raise ValueError(f"{resume} was written by {len(rng)} processes; resume it with as many, not {ctx.world}")
        _set_rng_state(rng[ctx.rank] if isinstance(rng, list) else rng)

    config_text = gin.config_str()
    if ctx.main:
        (model_dir / "config.gin").write_text(config_text)
        print(f"mtp: {model.num_params():,} parameters, {precision}, {ctx.world} process(es), global batch "
              f"{batch_size} ({per_rank} x {grad_accum_steps} accumulation per process); {source}", file=sys.stderr)
    logger = Logger(model_dir, ctx.main)
    lengths = dict(task_feature_lengths)
    example_flops = model.training_flops(lengths.get("inputs", 0), lengths["targets"])

    def save(at_step: int) -> None:
        tmp = checkpoints.temporary_dir(model_dir, at_step)
        if ctx.main:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash while writing this step before
            tmp.mkdir(parents=True)
        ctx.barrier()
        stream.save(tmp / f"data_rank{ctx.rank}")
        rng = _gather_rng(ctx)
        model_state, optimizer_state = full_state(model, optimizer, fsdp)
        if ctx.main:
            model_lib.save(model, tmp / "model.safetensors", model_state)
            torch.save({"step": at_step, "optimizer": optimizer_state, "rng": rng}, tmp / "train_state.pt")
            (tmp / "meta.json").write_text(json.dumps({"step": at_step, "world_size": ctx.world}))
            (tmp / "config.gin").write_text(config_text)
            checkpoints.commit(model_dir, at_step, keep_checkpoints)
        ctx.barrier()

    bar = None
    if ctx.main and progress:
        from tqdm import tqdm

        bar = tqdm(total=train_steps, initial=step, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
    last: dict[str, float] = {}
    tokens_since, time_since, losses_since = 0, time.perf_counter(), []
    tokens_per_second = 0.0
    while step < train_steps:
        lr = optim.learning_rate(step, train_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [next(stream) for _ in range(grad_accum_steps)]
        local_weight = sum(b["decoder_loss_weights"].sum().item() for b in micro)
        total_weight = ctx.sum(local_weight)
        loss_sum = 0.0
        for i, batch in enumerate(micro):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            sync = gradient_sync(wrapped, ctx, fsdp, enabled=i == len(micro) - 1)
            with sync, precision_lib.autocast(precision, device):
                loss, _ = model.loss(batch, z_loss=z_loss, forward=wrapped)
                # DDP and FSDP average gradients over processes; scale so that the result is the gradient of
                # (sum of token losses) / (total weight) over the global batch.
                (loss * ctx.world / max(total_weight, 1.0)).backward()
            loss_sum += loss.item()
            tokens_since += int(sum((batch[k] != 0).sum().item() for k in ("encoder_input_tokens",
                                                                           "decoder_target_tokens")))
        grad_norm = float("nan")
        if clip_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # DTensor under FSDP
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        step_loss = ctx.sum(loss_sum) / max(total_weight, 1.0)
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"loss is {step_loss} at step {step}; the last checkpoint is intact")
        losses_since.append(step_loss)
        if step % log_every == 0 or step == train_steps:
            elapsed = time.perf_counter() - time_since
            tokens_per_second = ctx.sum(tokens_since) / elapsed
            last = {"loss": sum(losses_since) / len(losses_since), "learning_rate": lr, "grad_norm": grad_norm,
                    "tokens_per_second": tokens_per_second,
                    "flops_per_second": example_flops * batch_size * len(losses_since) / elapsed}
            logger.log(step, last)
            tokens_since, time_since, losses_since = 0, time.perf_counter(), []
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens_per_second:.0f}", refresh=False)
        if eval_every and step % eval_every == 0:
            _evaluate_and_log(model, mixture_or_task_name, lengths, eval_num_examples, eval_max_decode_length,
                              precision, device, step, ctx, logger)
        if step % checkpoint_every == 0 or step == train_steps:
            save(step)
    if bar is not None:
        bar.close()
    if not last and ctx.main:
        print(f"mtp: {model_dir} is already at step {step} >= TRAIN_STEPS; nothing to do", file=sys.stderr)
    logger.close()
    return {"step": step, "model_dir": str(model_dir), **last}


def _gather_rng(ctx: Distributed) -> list | dict:
    state = _rng_state()
    if ctx.world == 1:
        return state
    gathered: list = [None] * ctx.world
    dist.all_gather_object(gathered, state)
    return gathered


def _evaluate_and_log(model, name, lengths, num_examples, max_len, precision, device, step, ctx, logger) -> None:
    if ctx.main:
        metrics = evaluate.evaluate(model, name, task_feature_lengths=lengths, num_examples=num_examples,
                                    max_decode_length=max_len, precision=precision, device=device, step=step)
        logger.log(step, {f"eval/{task}/{k}": v for task, m in metrics.items() for k, v in m.items()})
    ctx.barrier()
