"""Where a training step's time goes, ours against Hugging Face's T5: torch.profiler's operators, grouped.

    python benchmarks/profile_training.py [--batch 4] [--inputs 512] [--targets 114] [--dtype fp32] [--device auto]
        [--top 8] [--shapes]

Each side, in its own process, runs two warm-up steps and one profiled step (forward, backward, AdamW) of the T5 1.1
small shape (`model_throughput.py`'s), then prints its step time and the share of it in matrix products
(mm/addmm/bmm/linear and their backward, attention kernels), in the optimizer, and in everything else, with the
heaviest operators. A side whose matrix products take most of the step can only gain from fewer FLOPs or faster
products; the rest is what fusing and fewer small operations can win.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import harness  # benchmarks/harness.py: Python puts the script's directory first on the path
import model_throughput
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from mtplatform import precision
from mtplatform.model import T5

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
          "aten::_scaled_dot_product", "aten::_efficient_attention", "aten::_flash_attention", "aten::_cudnn_attention")
OPTIMIZER = ("aten::_foreach", "Optimizer.step", "aten::_fused_adam")


def group(name: str) -> str:
    if name.startswith(OPTIMIZER):
        return "optimizer"
    if name.startswith(MATMUL):
        return "matrix products"
    return "other"


def side(args: argparse.Namespace) -> None:
    cfg, on = model_throughput.model_config(), harness.device(args.device)
    torch.manual_seed(0)
    batch = {k: v.to(on) for k, v in model_throughput.make_batch(cfg, args.batch, args.inputs, args.targets).items()}
    if args.side == "ours":
        model = T5(cfg).train().to(on)

        def loss():
            total, weight = model.loss(batch)
            return total / weight
    else:
        model = harness.hf_t5(cfg, like=T5(cfg)).train().to(on)

        def loss():
            return model(input_ids=batch["encoder_input_tokens"], decoder_input_ids=batch["decoder_input_tokens"],
                         labels=batch["decoder_target_tokens"]).loss
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as mtp train; and HF Trainer's default

    def step():
        with precision.autocast(args.dtype, on):
            loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    harness.time_steps(step, 2, 0, on)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on.type == "cuda" else [])
    with profile(activities=activities, record_shapes=args.shapes) as prof:
        began = time.perf_counter()
        step()
        harness.synchronize(on)
        seconds = time.perf_counter() - began
    # On a GPU an operator's self device time is the time of the kernels it launched; the kernels are events too
    # (device type CUDA), so only the operators are summed.
    attribute = "self_device_time_total" if on.type == "cuda" else "self_cpu_time_total"
    ops = {e.key: getattr(e, attribute) / 1e6 for e in prof.key_averages()
           if e.device_type == DeviceType.CPU and getattr(e, attribute) > 0}
    shapes = sorted(((getattr(e, attribute) / 1e6, f"{e.key} {e.input_shapes}")
                     for e in prof.key_averages(group_by_input_shape=True) if e.device_type == DeviceType.CPU),
                    reverse=True)[:args.top]
    print(json.dumps({"seconds": seconds, "ops": ops, "shapes": shapes}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--inputs", type=int, default=512)
    p.add_argument("--targets", type=int, default=114)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (the GPU where there is one)")
    p.add_argument("--top", type=int, default=8, help="operators listed per side")
    p.add_argument("--shapes", action="store_true", help="also list the heaviest operators by input shapes")
    p.add_argument("--side", choices=["ours", "hf"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        return side(args)
    print(f"machine: {harness.machine()}")
    print(f"one profiled step after two warm-up steps, batch {args.batch}, inputs {args.inputs}, targets "
          f"{args.targets}, {args.dtype}, on {harness.device(args.device).type}", flush=True)
    for name in ("ours", "hf"):
        child = subprocess.run([sys.executable, __file__, "--side", name, "--batch", str(args.batch), "--inputs",
                                str(args.inputs), "--targets", str(args.targets), "--dtype", args.dtype, "--device",
                                args.device, "--top", str(args.top)] + (["--shapes"] if args.shapes else []),
                               capture_output=True, text=True)
        if child.returncode != 0:
            raise SystemExit(f"profile_training.py --side {name} failed:\n{child.stderr[-3000:]}")
        got = json.loads(child.stdout.strip().splitlines()[-1])
        profiled = sum(got["ops"].values())
        groups: dict[str, float] = {}
        for op, s in got["ops"].items():
            groups[group(op)] = groups.get(group(op), 0.0) + s
        shares = ", ".join(f"{g} {s / profiled:.0%}" for g, s in sorted(groups.items(), key=lambda x: -x[1]))
        busy = (f"; the GPU computed for {profiled / got['seconds']:.0%} of it (the rest waits on launches)"
                if harness.device(args.device).type == "cuda" else "")
        print(f"{name:>4}: step {got['seconds'] * 1e3:.1f} ms{busy}; self time: {shares}")
        for op, s in sorted(got["ops"].items(), key=lambda x: -x[1])[:args.top]:
            print(f"      {s / profiled:6.1%}  {op}")
        if args.shapes:
            print("      by input shapes:")
            for s, op in got["shapes"]:
                print(f"      {s / profiled:6.1%}  {op}")


if __name__ == "__main__":
    main()
