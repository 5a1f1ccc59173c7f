"""Greedy decoding throughput of our T5 (key/value cache) against transformers' `generate`, same weights, same run.

T5 1.1 small shape, batch 8, inputs 512, up to 64 new tokens, fp32, randomly initialised weights shared by both.
Both models are checked to produce the same tokens (so they do the same work), then timed alternately.

    python benchmarks/decode_throughput.py [--quick]

The last line is `ratio_greedy=<ours/HF>` (generated tokens per second).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mtplatform.model import T5Config, config_to_hf, from_hf_state_dict


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 timed runs after 1 warm-up")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--inputs", type=int, default=512)
    p.add_argument("--new_tokens", type=int, default=64)
    args = p.parse_args()
    runs, warmup = (2, 1) if args.quick else (args.runs, 1)

    from transformers import T5Config as HFConfig
    from transformers import T5ForConditionalGeneration

    cfg = T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6)
    torch.manual_seed(0)
    hf = T5ForConditionalGeneration(HFConfig(**{k: v for k, v in config_to_hf(cfg).items()
                                                if k != "architectures"})).eval()
    ours = from_hf_state_dict(hf.state_dict(), cfg).eval()
    enc = torch.randint(2, cfg.vocab_size, (args.batch, args.inputs), generator=torch.Generator().manual_seed(1))

    def run_hf():
        return hf.generate(input_ids=enc, attention_mask=torch.ones_like(enc), max_new_tokens=args.new_tokens,
                           do_sample=False, num_beams=1)[:, 1:]

    def run_ours():
        return ours.generate(enc, max_length=args.new_tokens)

    with torch.no_grad():
        theirs, mine = run_hf(), run_ours()
    same = theirs.tolist() == mine.tolist()
    print(f"same tokens: {same}")
    if not same:
        raise SystemExit("ours and transformers decoded different tokens: the comparison would not be fair")
    generated = int((mine != cfg.pad_id).sum())
    times = {"ours": [], "hf": []}
    with torch.no_grad():
        for i in range(warmup + runs):
            for name, fn in (("ours", run_ours), ("hf", run_hf)):
                t0 = time.perf_counter()
                fn()
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
    ours_tps, hf_tps = generated / statistics.median(times["ours"]), generated / statistics.median(times["hf"])
    print(f"greedy, batch {args.batch}, inputs {args.inputs}, up to {args.new_tokens} new tokens "
          f"({generated} generated): "
          f"ours {ours_tps:.0f} tokens/s   HF {hf_tps:.0f} tokens/s")
    print(f"ratio_greedy={ours_tps / hf_tps:.3f}")


if __name__ == "__main__":
    main()
