"""Greedy decoding throughput of our T5 (key/value cache) against transformers' `generate`, same weights and inputs.

T5 1.1 small shape, batch 8, inputs 512, up to 64 new tokens, fp32, randomly initialised weights (seed 0) that both
sides load. Each side runs in its own process, the sides alternating over rounds (`harness.py`); both must produce
the same tokens (compared by a hash of them), so that they do the same work.

    python benchmarks/decode_throughput.py [--quick] [--rounds R] [--runs N]

The last line is `ratio_greedy=<ours/HF, median generated tokens per second>`.
"""

from __future__ import annotations

import argparse
import hashlib

import harness  # benchmarks/harness.py: Python puts the script's directory first on the path
import torch

from mtplatform.model import T5Config, config_to_hf, from_hf_state_dict


def side(args: argparse.Namespace) -> None:
    """One side's decoding, in this process: the shared weights, a warm-up run, timed runs."""
    from transformers import T5Config as HFConfig
    from transformers import T5ForConditionalGeneration

    cfg = T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6)
    torch.manual_seed(0)
    hf = T5ForConditionalGeneration(HFConfig(**{k: v for k, v in config_to_hf(cfg).items()
                                                if k != "architectures"})).eval()
    enc = torch.randint(2, cfg.vocab_size, (args.batch, args.inputs), generator=torch.Generator().manual_seed(1))
    if args.side == "ours":
        ours = from_hf_state_dict(hf.state_dict(), cfg).eval()
        del hf

        def decode():
            return ours.generate(enc, max_length=args.new_tokens)
    else:
        def decode():
            return hf.generate(input_ids=enc, attention_mask=torch.ones_like(enc), max_new_tokens=args.new_tokens,
                               do_sample=False, num_beams=1)[:, 1:]

    with torch.no_grad():
        tokens = decode()
        seconds = harness.time_steps(decode, args.warmup, args.runs)
    harness.report_side(seconds, generated=int((tokens != cfg.pad_id).sum()),
                        tokens_sha=hashlib.sha256(str(tokens.tolist()).encode()).hexdigest())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 rounds of 2 timed runs per side")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=0, help="untimed runs after the first (which checks the tokens)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--inputs", type=int, default=512)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--side", choices=["ours", "hf"], help=argparse.SUPPRESS)  # a child measuring one side
    args = p.parse_args()
    if args.side:
        return side(args)
    if args.quick:
        args.rounds, args.runs = 2, 2
    print(f"machine: {harness.machine()}")
    shape = ["--batch", str(args.batch), "--inputs", str(args.inputs), "--new_tokens", str(args.new_tokens),
             "--runs", str(args.runs), "--warmup", str(args.warmup)]
    got = harness.run_sides(__file__, ["ours", "hf"], args.rounds, shape)
    same = got["ours"]["tokens_sha"] == got["hf"]["tokens_sha"]
    print(f"same tokens: {same}")
    if not same:
        raise SystemExit("ours and transformers decoded different tokens: the comparison would not be fair")
    generated = got["ours"]["generated"]
    medians = {}
    for name in ("ours", "hf"):
        best, medians[name] = harness.rates(generated, got[name]["seconds"])
        print(f"greedy {name:>4}: {medians[name]:6.0f} tokens/s median, {best:6.0f} best "
              f"({len(got[name]['seconds'])} runs), peak memory {got[name]['peak_mib']:,.0f} MiB")
    print(f"greedy, batch {args.batch}, inputs {args.inputs}, up to {args.new_tokens} new tokens ({generated} "
          f"generated)")
    print(f"ratio_greedy={medians['ours'] / medians['hf']:.3f}")


if __name__ == "__main__":
    main()
