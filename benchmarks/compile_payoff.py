"""Where `train.torch_compile` pays: our training step eager against compiled, at the experiments' model sizes and
batch (gin/models/<model>.gin, 16 rows of 128 input and 32 target tokens, the precision `auto` picks, fused AdamW),
and what compiling costs the first step of a process with an empty compile cache and with a warm one.

    python benchmarks/compile_payoff.py [--model mini] [--rounds 2] [--steps 30]

Three sides, each in its own process, alternating over rounds (`harness.py`): `eager`; `cold`, compiled with an
empty cache directory (`TORCHINDUCTOR_CACHE_DIR`, emptied first); `warm`, compiled with the cache a `cold` process
left, as a later stage of an experiment finds it (the stages of an experiment share shapes). Prints the median step
of each side, the first step of the compiled ones, `compile_speedup` (eager step over compiled step) and
`break_even_steps_cold` / `_warm`: the steps after which a compiled run has caught up its first step's compiling
(none where compiling is not faster).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import harness
import torch
from model_throughput import make_batch  # the same random batch as the training benchmark's

from mtplatform import precision
from mtplatform.model import T5, T5Config

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("eager", "cold", "warm")


def model_config(model: str) -> T5Config:
    """The T5Config gin/models/<model>.gin binds."""
    import gin

    import mtplatform

    mtplatform.register_configurables()
    gin.add_config_file_search_path(str(ROOT))
    gin.parse_config_file(str(ROOT / "gin" / "models" / f"{model}.gin"))
    return T5Config()


def side(args: argparse.Namespace) -> None:
    """One side in this process: its first step (compiling, where compiled) timed apart, then the timed steps."""
    if args.side == "cold":
        shutil.rmtree(args.cache_dir, ignore_errors=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.cache_dir
    harness.set_allocator("ours")  # as `mtp train` runs
    cfg = model_config(args.model)
    torch.manual_seed(0)
    model = T5(cfg).train()
    forward = model if args.side == "eager" else torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batch = make_batch(cfg, args.batch, args.inputs, args.targets)
    autocast = precision.autocast(precision.resolve("auto", torch.device("cpu")), torch.device("cpu"))

    def step():
        with autocast:
            loss, weight = model.loss(batch, forward=forward)
        (loss / weight).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    first = harness.time_steps(step, 0, 1)[0]
    harness.report_side(harness.time_steps(step, 3, args.steps), first_step_s=first)


def break_even(first: float, eager: float, compiled: float) -> str:
    """Steps after which the compiled run has earned back its first step's extra time ('none' if it never does)."""
    return f"{(first - eager) / (eager - compiled):.0f}" if compiled < eager else "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mini", help="a file of gin/models/ (mini: the experiments' model)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--inputs", type=int, default=128)
    parser.add_argument("--targets", type=int, default=32)
    parser.add_argument("--side", choices=SIDES)
    parser.add_argument("--cache_dir")
    args = parser.parse_args()
    if args.side:
        return side(args)
    print(harness.machine())
    print(f"model {args.model}, batch {args.batch} x ({args.inputs}, {args.targets}), precision "
          f"{precision.resolve('auto', torch.device('cpu'))}")
    with tempfile.TemporaryDirectory() as cache:
        passed = ["--model", args.model, "--steps", str(args.steps), "--batch", str(args.batch), "--inputs",
                  str(args.inputs), "--targets", str(args.targets), "--cache_dir", cache]
        results = harness.run_sides(__file__, SIDES, args.rounds, passed)
    step = {s: statistics.median(results[s]["seconds"]) for s in SIDES}
    compiled = min(step["cold"], step["warm"])  # the same compiled code: the quieter process's figure
    for s in SIDES:
        print(f"{s}_step_s={step[s]:.4f}")
    first = {s: results[s]["first_step_s"] for s in ("cold", "warm")}  # the last round's
    for s, seconds in first.items():
        print(f"{s}_first_step_s={seconds:.1f}")
    print(f"break_even_steps_cold={break_even(first['cold'], step['eager'], compiled)}")
    print(f"break_even_steps_warm={break_even(first['warm'], step['eager'], compiled)}")
    print(f"compile_speedup={step['eager'] / compiled:.3f}")


if __name__ == "__main__":
    main()
