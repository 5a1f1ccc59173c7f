"""int8 inference (`mtp eval/infer --quantize=int8`) against fp32: size on disk and greedy decoding tokens/s.

T5 1.1 small shape (as `decode_throughput.py`), randomly initialised weights (seed 0), batch 8, inputs 512, up to
64 new tokens, on the CPU. Each side (fp32, int8: `mtplatform.quantize.int8` of the same weights) runs in its own
process, the sides alternating over rounds (`harness.py`). Size on disk is the weights as `torch.save` writes them.
Random weights make no text worth scoring (`tests/test_quantize.py` scores a checkpoint both ways on real data);
here the share of decoded positions on which int8 and fp32 agree is printed.

    python benchmarks/quantize.py [--quick] [--threads N]

The last lines are `size_ratio=<int8 bytes / fp32 bytes>` and `ratio_int8=<int8 / fp32, median tokens per second>`.
"""

from __future__ import annotations

import argparse

import harness  # benchmarks/harness.py: Python puts the script's directory first on the path
import torch
from decode_throughput import CONFIG  # the same T5 1.1 small shape as the decoding benchmark

from mtplatform import quantize
from mtplatform.model import T5


def side(args: argparse.Namespace) -> None:
    """One side's decoding, in this process: the seeded weights (quantized for int8), a first run, timed runs."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = T5(CONFIG).eval()
    if args.side == "int8":
        model = quantize.int8(model)
    enc = torch.randint(2, CONFIG.vocab_size, (args.batch, args.inputs), generator=torch.Generator().manual_seed(1))

    def decode():
        return model.generate(enc, max_length=args.new_tokens)

    with torch.no_grad():
        tokens = decode()
        seconds = harness.time_steps(decode, 0, args.runs)
    harness.report_side(seconds, generated=tokens.numel(), tokens=tokens.tolist(), bytes=quantize.state_bytes(model),
                        linears=quantize.quantized_linears(model))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 rounds of 2 timed runs per side")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--inputs", type=int, default=512)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per side")
    p.add_argument("--side", choices=["fp32", "int8"], help=argparse.SUPPRESS)  # a child measuring one side
    args = p.parse_args()
    if args.side:
        return side(args)
    if args.quick:
        args.rounds, args.runs = 2, 2
    print(f"machine: {harness.machine()}; {args.threads} thread(s) per side")
    shape = ["--batch", str(args.batch), "--inputs", str(args.inputs), "--new_tokens", str(args.new_tokens),
             "--runs", str(args.runs), "--threads", str(args.threads)]
    got = harness.run_sides(__file__, ["fp32", "int8"], args.rounds, shape)
    equal = harness.share_equal(got["fp32"]["tokens"], got["int8"]["tokens"])
    print(f"int8: {got['int8']['linears']} linear layers quantized; {equal:.1%} of decoded positions equal to fp32's")
    generated = got["fp32"]["generated"]
    medians = {}
    for name in ("fp32", "int8"):
        best, medians[name] = harness.rates(generated, got[name]["seconds"])
        print(f"greedy {name}: {medians[name]:6.0f} tokens/s median, {best:6.0f} best, weights "
              f"{got[name]['bytes'] / 2**20:,.1f} MiB, peak memory {got[name]['peak_mib']:,.0f} MiB")
    print(f"size_ratio={got['int8']['bytes'] / got['fp32']['bytes']:.3f}")
    print(f"ratio_int8={medians['int8'] / medians['fp32']:.3f}")


if __name__ == "__main__":
    main()
