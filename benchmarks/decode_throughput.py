"""Greedy decoding throughput of our T5 (key/value cache) against transformers' `generate`, same weights and inputs.

T5 1.1 small shape, batch 8, inputs 512, up to 64 new tokens, randomly initialised weights (seed 0) that both
sides load, in the precision `mtp eval` picks here (`--precision auto`: bf16 autocast where bf16 is native, on both
sides). Each side runs in its own process, the sides alternating over rounds (`harness.py`). The sides must do the
same work: decode the same number of positions (where they do not, the ratio is printed as
`ratio_greedy_work_differs=`). In fp32 they decode the same tokens too; in bf16 each side's rounding differs (our
attention kernels, one cast of each norm's output), and on random weights, whose logits are nearly flat, that flips
tokens: the script prints the share of positions equal. Our process keeps the memory it frees
(`mtplatform.allocator`, as `mtp eval` does); the peer's runs as a transformers script does, and a third side, the
peer with the same allocator setting, says how much of the ratio that setting is (`ratio_greedy_same_allocator`).
A fourth side is ours with compiled steps on a CPU (`compile_steps=True`, `evaluate_checkpoint.compile_decoding`):
its first decode in each process compiles (inductor's on-disk cache makes later rounds' compiles shorter) and is not
timed; the script prints how long it took.

    python benchmarks/decode_throughput.py [--quick] [--rounds R] [--runs N] [--device auto|cpu|cuda] [--batch B]
                                           [--precision auto|fp32|bf16]

The last lines are `ratio_greedy=<ours/HF, median decoded positions per second>` (batch x decoded length, what both
sides compute: a position after a sequence's EOS is computed too, until every sequence has ended) and
`ratio_greedy_same_allocator=`, then `ratio_greedy_compiled=` (ours with compiled steps over HF).
"""

from __future__ import annotations

import argparse
import time

import harness  # benchmarks/harness.py: Python puts the script's directory first on the path
import torch

from mtplatform import precision
from mtplatform.huggingface import from_hf_state_dict
from mtplatform.model import T5Config

CONFIG = T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6)
SIDES = {**harness.SIDES, "ours_compiled": "ours, compiled steps"}
def side(args: argparse.Namespace) -> None:
    """One side's decoding, in this process: the shared weights, a warm-up run, timed runs."""
    harness.set_allocator(args.side)
    cfg = CONFIG
    on = harness.device(args.device)
    torch.manual_seed(0)
    hf = harness.hf_t5(cfg).eval()
    enc = torch.randint(2, cfg.vocab_size, (args.batch, args.inputs),
                        generator=torch.Generator().manual_seed(1)).to(on)
    if args.side in ("ours", "ours_compiled"):
        ours = from_hf_state_dict(hf.state_dict(), cfg).eval().to(on)
        del hf

        def decode():
            return ours.generate(enc, max_length=args.new_tokens, compile_steps=args.side == "ours_compiled")
    else:
        hf = hf.to(on)

        def decode():
            return hf.generate(input_ids=enc, attention_mask=torch.ones_like(enc), max_new_tokens=args.new_tokens,
                               do_sample=False, num_beams=1)[:, 1:]

    with torch.no_grad(), precision.autocast(args.precision, on):
        began = time.perf_counter()
        tokens = decode()
        first_s = time.perf_counter() - began
        seconds = harness.time_steps(decode, args.warmup, args.runs, on)
    harness.report_side(seconds, on, generated=tokens.numel(), tokens=tokens.tolist(), first_s=first_s)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 rounds of 2 timed runs per side")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=0, help="untimed runs after the first (which checks the tokens)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--inputs", type=int, default=512)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (the GPU where there is one)")
    p.add_argument("--precision", default="auto", help="fp32, bf16, or auto (bf16 where it is native)")
    p.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)  # a child measuring one side
    args = p.parse_args()
    if args.side:
        return side(args)
    if args.quick:
        args.rounds, args.runs = 2, 2
    args.precision = precision.resolve(args.precision, harness.device(args.device))
    print(f"machine: {harness.machine()}; {args.precision}")
    shape = ["--batch", str(args.batch), "--inputs", str(args.inputs), "--new_tokens", str(args.new_tokens),
             "--runs", str(args.runs), "--warmup", str(args.warmup), "--device", args.device,
             "--precision", args.precision]
    got = harness.run_sides(__file__, list(SIDES), args.rounds, shape)
    same = got["ours"]["tokens"] == got["hf"]["tokens"] == got["hf_kept"]["tokens"]
    same_work = len({got[side]["generated"] for side in SIDES}) == 1
    if same:
        print("same tokens: True")
    else:  # kernels differ (GPUs, bf16): a near-tie can flip one token and, after it, the rest of that sequence
        equal = harness.share_equal(got["ours"]["tokens"], got["hf"]["tokens"])
        print(f"same tokens: False ({equal:.1%} of positions equal); the same number of positions decoded: "
              f"{same_work}{'' if same_work else ': the sides did not do the same work, the ratio is marked'}")
    generated = got["ours"]["generated"]
    medians = {}
    for name, label in SIDES.items():
        best, medians[name] = harness.rates(generated, got[name]["seconds"])
        print(f"greedy {label:>21}: {medians[name]:6.0f} tokens/s median, {best:6.0f} best "
              f"({len(got[name]['seconds'])} runs), peak memory {got[name]['peak_mib']:,.0f} MiB")
    not_padding = sum(t != CONFIG.pad_id for row in got["ours"]["tokens"] for t in row)
    print(f"greedy, batch {args.batch}, inputs {args.inputs}, up to {args.new_tokens} new tokens ({generated} "
          f"positions decoded, {not_padding} of them not padding), {args.precision}")
    differ = "" if same_work else "_work_differs"
    print(f"ratio_greedy{differ}={medians['ours'] / medians['hf']:.3f}")
    print(f"compiled steps: the first decode of the last round's process took {got['ours_compiled']['first_s']:.1f} s "
          f"(compiling), against {got['ours']['first_s']:.1f} s eager; "
          f"{harness.share_equal(got['ours_compiled']['tokens'], got['ours']['tokens']):.1%} of positions equal to "
          "ours eager")
    print(f"ratio_greedy_same_allocator{differ}={medians['ours'] / medians['hf_kept']:.3f}")
    print(f"ratio_greedy_compiled{differ}={medians['ours_compiled'] / medians['hf']:.3f}")


if __name__ == "__main__":
    main()
