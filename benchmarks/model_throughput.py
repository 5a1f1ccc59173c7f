"""Training throughput of our T5 against Hugging Face's T5ForConditionalGeneration: same config, starting weights
(`harness.hf_t5`), optimizer, batch.

T5 1.1 small shape (d_model 512, 8+8 layers, 6 heads, d_kv 64, d_ff 1024, vocab 32128), batch 8, inputs 512,
targets 114; one step = forward, backward, AdamW update (fused: as `mtp train` builds it, and as transformers'
Trainer does by default with torch >= 2.8). Tokens/s counts input and target tokens. Each side runs in
its own process, the sides alternating over rounds (`harness.py`); the script prints min and median per side, peak
memory, the CPU's bf16 hardware, the threads, and MFU: our model FLOPs per second over the matrix-product peak of
the same precision measured in the same run. Our process keeps the memory it frees (`mtplatform.allocator`, as
`mtp train` does); the peer's runs as a transformers script does, and a third side, the peer with the same
allocator setting, says how much of the ratio that setting is (`ratio_<dtype>_same_allocator`).

    python benchmarks/model_throughput.py [--quick] [--rounds R] [--steps N] [--dtypes fp32,bf16]
                                         [--device auto|cpu|cuda] [--compile] [--batch B]

Last lines: `ratio_fp32=`, `ratio_bf16=` (ours/HF, median tokens/s), `ratio_fp32_same_allocator=`,
`ratio_bf16_same_allocator=` and `mfu=` (in the precision `auto` picks here). On a CPU without native bf16 (no
AMX / AVX512-BF16) bf16 is emulated, far slower than fp32 for both models: the script says so and prints no bf16
ratio.
"""

from __future__ import annotations

import argparse

import harness  # benchmarks/harness.py: Python puts the script's directory first on the path
import torch

from mtplatform import precision
from mtplatform.accounting import training_flops
from mtplatform.model import T5, T5Config


def make_batch(cfg: T5Config, batch: int, inputs: int, targets: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    enc = torch.randint(2, cfg.vocab_size, (batch, inputs), generator=g)
    tgt = torch.randint(2, cfg.vocab_size, (batch, targets), generator=g)
    dec = torch.cat([torch.zeros(batch, 1, dtype=torch.long), tgt[:, :-1]], 1)
    return {"encoder_input_tokens": enc, "decoder_input_tokens": dec, "decoder_target_tokens": tgt,
            "decoder_loss_weights": torch.ones(batch, targets)}


def side(args: argparse.Namespace) -> None:
    """One side's measurement, in this process: a fresh model, warm-up steps, timed steps. With `--compile`, the
    first warm-up step compiles; its time is reported apart."""
    harness.set_allocator(args.side)
    cfg, on = model_config(), harness.device(args.device)
    torch.manual_seed(0)
    if args.side == "ours":
        model = T5(cfg).train().to(on)
        forward = torch.compile(model) if args.compile else model

        def loss_step(batch):
            loss, weight = model.loss(batch, forward=forward)
            (loss / weight).backward()
    else:
        model = harness.hf_t5(cfg, like=T5(cfg)).train().to(on)
        forward = torch.compile(model) if args.compile else model

        def loss_step(batch):
            forward(input_ids=batch["encoder_input_tokens"], decoder_input_ids=batch["decoder_input_tokens"],
                    labels=batch["decoder_target_tokens"]).loss.backward()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as mtp train; and HF Trainer's default
    batch = {k: v.to(on) for k, v in make_batch(cfg, args.batch, args.inputs, args.targets).items()}
    autocast = precision.autocast(args.dtype, on)

    def step():
        with autocast:
            loss_step(batch)
        opt.step()
        opt.zero_grad(set_to_none=True)

    first = harness.time_steps(step, 0, 1, on)[0] if args.compile else None
    harness.report_side(harness.time_steps(step, args.warmup, args.steps, on), on,
                        params=sum(p.numel() for p in model.parameters()), first_step_s=first)


def model_config() -> T5Config:
    return T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
                    feed_forward="gated-gelu", dropout_rate=0.0)


def compare(args: argparse.Namespace, dtype: str) -> tuple[float, float, float]:
    """Every side in `dtype`: prints their figures; returns ours/HF and ours/HF-with-our-allocator (median
    tokens/s), and our MFU."""
    shape = ["--batch", str(args.batch), "--inputs", str(args.inputs), "--targets", str(args.targets),
             "--steps", str(args.steps), "--warmup", str(args.warmup), "--dtype", dtype, "--device", args.device,
             *(["--compile"] if args.compile else [])]
    got = harness.run_sides(__file__, list(harness.SIDES), args.rounds, shape)
    tokens = args.batch * (args.inputs + args.targets)
    flops = args.batch * training_flops(model_config(), args.inputs, args.targets)
    on = harness.device(args.device)
    peak = harness.matmul_peak(torch.bfloat16 if dtype == "bf16" else torch.float32, on)
    medians = {}
    for name, label in harness.SIDES.items():
        best, medians[name] = harness.rates(tokens, got[name]["seconds"])
        compiled = f", first (compiling) step {got[name]['first_step_s']:.1f} s" if args.compile else ""
        print(f"{dtype} {label:>21}: {medians[name]:8.0f} tokens/s median, {best:8.0f} best "
              f"({len(got[name]['seconds'])} steps), peak memory {got[name]['peak_mib']:,.0f} MiB{compiled}, "
              f"{got[name]['params']:,} parameters", flush=True)
    ratio, same_allocator = medians["ours"] / medians["hf"], medians["ours"] / medians["hf_kept"]
    mfu = harness.rates(flops, got["ours"]["seconds"])[1] / peak
    print(f"{dtype}: ratio {ratio:.2f} ({same_allocator:.2f} against the peer keeping its freed memory); ours at "
          f"{mfu:.1%} of the {dtype} matrix-product peak measured here ({peak / 1e9:,.0f} GFLOP/s)", flush=True)
    return ratio, same_allocator, mfu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 rounds of 2 timed steps per process")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    # Three: a process that keeps its freed memory stops faulting pages in after a few steps (`packed_throughput`).
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--inputs", type=int, default=512)
    p.add_argument("--targets", type=int, default=114)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (the GPU where there is one)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (the first step compiles; "
                   "its time is printed apart)")
    p.add_argument("--side", choices=list(harness.SIDES), help=argparse.SUPPRESS)  # a child measuring one side
    p.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        return side(args)
    if args.quick:
        args.rounds, args.steps = 2, 2
    print(f"machine: {harness.machine()}")
    on = harness.device(args.device)
    print(f"shape: batch {args.batch}, inputs {args.inputs}, targets {args.targets}; {args.rounds} rounds of "
          f"{args.steps} timed steps per side, each side in its own process, on {on.type}"
          f"{', both compiled' if args.compile else ''}", flush=True)
    figures: dict[str, tuple[float, float, float]] = {}
    for dtype in args.dtypes.split(","):
        if dtype == "bf16" and not precision.native_bf16(on):
            print("bf16: emulated on this CPU (no AMX, no AVX512-BF16): PyTorch emulates bf16 products, far slower "
                  "than fp32 for both models, so no bf16 ratio is measured (training here uses fp32: "
                  "precision='auto')")
            continue
        figures[dtype] = compare(args, dtype)
        if dtype == "bf16" and on.type == "cpu" and harness.cpu_features() != "AMX":
            print(f"bf16: without AMX here (bf16 hardware: {harness.cpu_features()}): the bf16 targets (2.5x, MFU "
                  "0.40) are stated for AMX CPUs, so these figures are this CPU's, not a verdict on them")
    for dtype, (ratio, same_allocator, _) in figures.items():
        print(f"ratio_{dtype}={ratio:.3f}")
        print(f"ratio_{dtype}_same_allocator={same_allocator:.3f}")
    auto = precision.resolve("auto", on)
    if auto in figures:
        print(f"mfu={figures[auto][2]:.3f}")


if __name__ == "__main__":
    main()
