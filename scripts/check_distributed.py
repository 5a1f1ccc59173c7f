"""Check the trainer's distributed code (`mtplatform/distributed.py`) where it runs: gloo on CPUs, nccl on GPUs.

    torchrun --nproc_per_node=N scripts/check_distributed.py [--steps 4] [--precision fp32]

Every process trains the same small T5 on the same seeded global batches:
1. under SGD with momentum (whose steps scale with the gradient, so a wrong loss scale shows), three ways: one
   process's reference with the whole batch and no wrapper; DDP, each process its share in two micro-batches
   (`gradient_sync` skips the first all-reduce), the loss scaled as the trainer scales it (times processes over the
   global target weight); FSDP2, the same with the model sharded per block. Losses against the reference; FSDP's
   gathered weights (`full_state`) against DDP's.
2. under AdamW, FSDP2 stopped after `--steps`: its full state, written and read back, goes into a fresh sharded model
   and optimizer (`load_optimizer`), which must continue two steps as the model that did not stop.
It needs only torch (and gin, which the model imports), so it runs on a GPU machine without the input pipeline.
Rank 0 prints one line per check and exits non-zero where one fails.
"""

from __future__ import annotations

import argparse
import io
import sys

import torch
import torch.distributed as dist

from mtplatform import precision as precision_lib
from mtplatform.distributed import Distributed, full_state, gradient_sync, load_optimizer, setup_distributed, wrap_model
from mtplatform.model import T5, T5Config

CONFIG = T5Config(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, dropout_rate=0.0)
GLOBAL_BATCH, INPUTS, TARGETS, MICRO = 8, 32, 16, 2


def global_batch(step: int) -> dict[str, torch.Tensor]:
    """The step's global batch, the same on every process: random tokens with padding of random lengths."""
    g = torch.Generator().manual_seed(1000 + step)
    enc = torch.randint(2, CONFIG.vocab_size, (GLOBAL_BATCH, INPUTS), generator=g)
    tgt = torch.randint(2, CONFIG.vocab_size, (GLOBAL_BATCH, TARGETS), generator=g)
    enc *= torch.arange(INPUTS)[None] < torch.randint(INPUTS // 2, INPUTS + 1, (GLOBAL_BATCH, 1), generator=g)
    tgt *= torch.arange(TARGETS)[None] < torch.randint(2, TARGETS + 1, (GLOBAL_BATCH, 1), generator=g)
    dec = torch.cat([torch.zeros(GLOBAL_BATCH, 1, dtype=torch.long), tgt[:, :-1]], 1)
    return {"encoder_input_tokens": enc, "decoder_input_tokens": dec, "decoder_target_tokens": tgt,
            "decoder_loss_weights": (tgt != 0).float()}


def fresh_model(device: torch.device) -> T5:
    torch.manual_seed(0)
    return T5(CONFIG).to(device)


def optimizer_for(model: torch.nn.Module, name: str) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)


def train_steps(model: T5, wrapped: torch.nn.Module, opt: torch.optim.Optimizer, steps: range, ctx: Distributed,
                device: torch.device, precision: str, fsdp: bool, share: bool) -> list[float]:
    """Loss per step (per target token over the global batch), as `train.train_step` computes and scales it;
    `share`: this process takes its share of each batch, in MICRO micro-batches."""
    losses = []
    for step in steps:
        batch = global_batch(step)
        total_weight = batch["decoder_loss_weights"].sum().item()
        if share:
            mine = slice(ctx.rank * GLOBAL_BATCH // ctx.world, (ctx.rank + 1) * GLOBAL_BATCH // ctx.world)
            parts = [{k: v[mine] for k, v in batch.items()}]
            parts = [{k: v.chunk(MICRO)[i] for k, v in parts[0].items()} for i in range(MICRO)]
        else:
            parts = [batch]
        loss_sum = 0.0
        for i, part in enumerate(parts):
            part = {k: v.to(device) for k, v in part.items()}
            with gradient_sync(wrapped, fsdp, enabled=i == len(parts) - 1), precision_lib.autocast(precision, device):
                loss, _ = model.loss(part, forward=wrapped)
                scale = ctx.world if share else 1
                (loss * scale / total_weight).backward()
            loss_sum += loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append((ctx.sum(loss_sum) if share else loss_sum) / total_weight)
    return losses


def gathered_weights(model: torch.nn.Module, opt: torch.optim.Optimizer, fsdp: bool) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu() for k, v in full_state(model, opt, fsdp)[0].items()}


def through_a_file(state: tuple[dict, dict]) -> tuple[dict, dict]:
    """The state as every process reads it from a checkpoint: written by rank 0 (which alone holds the gathered
    state), read back by all (and no longer the live tensors that `full_state` may return)."""
    buffer = io.BytesIO()
    if dist.get_rank() == 0:
        torch.save(state, buffer)
    written = [buffer.getvalue()]
    dist.broadcast_object_list(written, src=0)
    return torch.load(io.BytesIO(written[0]), weights_only=False)


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest ||a - b|| / ||a|| over the tensors of two state dicts (NaN where `b` is a gathered state dict
    that only rank 0 holds)."""
    if not b:
        return float("nan")
    if a.keys() != b.keys():
        raise SystemExit(f"state dicts differ in names: {sorted(a.keys() ^ b.keys())}")
    return max(((a[k] - b[k]).norm() / a[k].norm().clamp(min=1e-12)).item() for k in a)


def arithmetic_checks(steps: range, **run) -> list[tuple[str, float]]:
    """DDP and FSDP against one process, under SGD with momentum: unlike Adam, its steps scale with the gradient, so
    a wrong loss scale or a gradient summed instead of averaged changes every later loss."""
    plain = fresh_model(run["device"])
    reference = train_steps(plain, plain, optimizer_for(plain, "sgd"), steps, fsdp=False, share=False, **run)
    ddp_model = fresh_model(run["device"])
    ddp, ddp_opt = wrap_model(ddp_model, fsdp=False), optimizer_for(ddp_model, "sgd")
    ddp_losses = train_steps(ddp_model, ddp, ddp_opt, steps, fsdp=False, share=True, **run)
    sharded = wrap_model(fresh_model(run["device"]), fsdp=True)
    sharded_opt = optimizer_for(sharded, "sgd")
    fsdp_losses = train_steps(sharded, sharded, sharded_opt, steps, fsdp=True, share=True, **run)
    return [
        ("DDP losses = one process's", largest(ddp_losses, reference)),
        ("FSDP losses = one process's", largest(fsdp_losses, reference)),
        ("FSDP gathered weights = DDP's (relative norm)", relative_difference(
            gathered_weights(ddp_model, ddp_opt, False), gathered_weights(sharded, sharded_opt, True))),
    ]


def resume_checks(first: range, later: range, **run) -> list[tuple[str, float]]:
    """FSDP under AdamW (step counts and two moments per parameter, all sharded), stopped after `first`: its full
    state, written and read back, restarts a fresh sharded model that must continue as the one that did not stop."""
    sharded = wrap_model(fresh_model(run["device"]), fsdp=True)
    sharded_opt = optimizer_for(sharded, "adamw")
    train_steps(sharded, sharded, sharded_opt, first, fsdp=True, share=True, **run)
    model_state, optimizer_state = through_a_file(full_state(sharded, sharded_opt, True))
    resumed = fresh_model(run["device"])
    resumed.load_state_dict(model_state)
    resumed = wrap_model(resumed, fsdp=True)
    resumed_opt = optimizer_for(resumed, "adamw")
    load_optimizer(resumed, resumed_opt, optimizer_state, True)
    continued = train_steps(sharded, sharded, sharded_opt, later, fsdp=True, share=True, **run)
    after_resume = train_steps(resumed, resumed, resumed_opt, later, fsdp=True, share=True, **run)
    return [("FSDP resumed from its full state = not stopped", largest(after_resume, continued))]


def largest(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--tolerance", type=float, default=None, help="largest loss / weight difference accepted "
                   "(default: 1e-4 in fp32, 2e-2 in bf16)")
    args = p.parse_args()
    tolerance = args.tolerance or (1e-4 if args.precision == "fp32" else 2e-2)
    ctx, device = setup_distributed(group_for_one=True)
    run = {"ctx": ctx, "device": device, "precision": args.precision}
    checks = (arithmetic_checks(range(args.steps + 2), **run)
              + resume_checks(range(args.steps), range(args.steps, args.steps + 2), **run))
    shared = [checks]
    dist.broadcast_object_list(shared, src=0)  # rank 0 holds the gathered weights: its figures decide for all
    checks = shared[0]
    failed = [name for name, diff in checks if not diff <= tolerance]
    if ctx.main:
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"check_distributed: {dist.get_backend()}, {ctx.world} process(es), {where}, torch {torch.__version__}, "
              f"{args.precision}, {args.steps}+2 steps")
        for name, diff in checks:
            print(f"  {'ok  ' if diff <= tolerance else 'FAIL'} {name}: largest difference {diff:.2e} "
                  f"(tolerance {tolerance:.0e})")
        print(f"check_distributed: {'all held' if not failed else f'{len(failed)} failed'}", flush=True)
    # Both processes finish their collectives before either tears its group down. Once (a fresh clone's suite,
    # 2026-12-05; not reproduced in 4 runs alone) rank 0 aborted at teardown after every check had held ("terminate
    # called without an active exception", SIGABRT) while rank 1, which prints nothing, had already gone: gloo's
    # threads outliving their work at exit is a known way to that abort (pytorch/pytorch#179291). Not proven the cause.
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
