"""Many processes, one model: joining torchrun's process group, DDP or FSDP2 around the model, gathered state.

The trainer's only contact with torch.distributed beyond a few collectives. It imports nothing but torch and the
model, so that the same code can be checked on a GPU machine that has no input pipeline installed
(`scripts/check_distributed.py`, which also records what held with nccl).

Gloo on CPU, nccl on GPU. Where a process group exists, the model goes through DDP (or FSDP2) even with one process,
so that `torchrun --nproc_per_node=1` runs the same code as eight processes; a plain `mtp train` makes no group.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mtplatform import model as model_lib


@dataclass
class Distributed:
    """This process's place among the processes; its collectives do nothing where there is no process group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def sum(self, value: float) -> float:
        if not dist.is_initialized():
            return value
        return self.sum_tensor(torch.tensor([value], dtype=torch.float64)).item()

    def sum_tensor(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over processes of a CPU tensor (moved to the GPU for nccl, which reduces only there)."""
        if not dist.is_initialized():
            return values
        on = values.cuda() if dist.get_backend() == "nccl" else values
        dist.all_reduce(on)
        return on.cpu()


def setup_distributed(group_for_one: bool = False) -> tuple[Distributed, torch.device]:
    """Join the process group when started by torchrun with several processes (gloo on CPU, nccl on GPU);
    `group_for_one` joins one for a single process too (checks of the distributed code on one GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if (world > 1 or group_for_one) and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return Distributed(rank, world, local), device


def wrap_model(model: model_lib.T5, fsdp: bool) -> torch.nn.Module:
    """The module to run forward through: the model itself (no process group), DDP over it, or the model sharded
    in place by FSDP2 (`fully_shard` per encoder/decoder block, then the root; its parameters become DTensors)."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        if model.cfg.shared_blocks is not None:  # a block runs several times a step: one shard, several gathers
            raise ValueError(f"train.fsdp = True with T5Config.shared_blocks = {model.cfg.shared_blocks}: FSDP "
                             "shards each block once and shared blocks run several times a step; train them with "
                             "DDP (fsdp = False)")

        for block in [*model.encoder, *model.decoder]:
            fully_shard(block)
        fully_shard(model)
        return model
    if dist.is_initialized():
        return torch.nn.parallel.DistributedDataParallel(model)
    return model


def gradient_sync(wrapped: torch.nn.Module, fsdp: bool, enabled: bool) -> AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if fsdp:
        wrapped.set_requires_gradient_sync(enabled)
        return nullcontext()
    if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) and not enabled:
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
    """Load a full (unsharded) optimizer state dict, as `full_state` gave it, into a plain or sharded model's."""
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
