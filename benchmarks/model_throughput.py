"""Training throughput of our T5 against Hugging Face's T5ForConditionalGeneration, same config, same run.

T5 1.1 small shape (d_model 512, 8+8 layers, 6 heads, d_kv 64, d_ff 1024, vocab 32128), batch 8, inputs 512,
targets 114; one step = forward, backward, AdamW update. Tokens/s counts input and target tokens. Both models run
alternately in one process, so machine noise hits both; the printed ratio is what to compare across machines.

    python benchmarks/model_throughput.py [--quick] [--steps N] [--threads T]

The last line is `ratio_bf16=<ours/HF>`.

On a CPU without native bf16 (no AMX / AVX512-BF16: `mtplatform.precision.native_bf16()` is False) bf16 is emulated
and a step at the full shape takes minutes for either model; the script then measures bf16 at batch 1 with one
timed step and says so, so that the ratio still comes from one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mtplatform import precision
from mtplatform.model import T5, T5Config, config_to_hf


def make_batch(cfg: T5Config, batch: int, inputs: int, targets: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    enc = torch.randint(2, cfg.vocab_size, (batch, inputs), generator=g)
    tgt = torch.randint(2, cfg.vocab_size, (batch, targets), generator=g)
    dec = torch.cat([torch.zeros(batch, 1, dtype=torch.long), tgt[:, :-1]], 1)
    return {"encoder_input_tokens": enc, "decoder_input_tokens": dec, "decoder_target_tokens": tgt,
            "decoder_loss_weights": torch.ones(batch, targets)}


def ours_step(model, opt, batch):
    loss, weight = model.loss(batch)
    (loss / weight).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def hf_step(model, opt, batch):
    out = model(input_ids=batch["encoder_input_tokens"], decoder_input_ids=batch["decoder_input_tokens"],
                labels=batch["decoder_target_tokens"])
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure(steps: int, warmup: int, batch: dict, runners: dict, dtype: str) -> dict[str, float]:
    """Seconds per step for each runner, interleaved step by step; median over steps."""
    autocast = precision.autocast(dtype)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(warmup + steps):
        for name, step in runners.items():
            t0 = time.perf_counter()
            with autocast:
                step(batch)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 timed steps after 1 warm-up (about 2 minutes here)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--inputs", type=int, default=512)
    p.add_argument("--targets", type=int, default=114)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtypes", default="fp32,bf16")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps, warmup = (2, 1) if args.quick else (args.steps, 2)

    from transformers import T5Config as HFConfig
    from transformers import T5ForConditionalGeneration

    cfg = T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
                   feed_forward="gated-gelu", dropout_rate=0.0)
    torch.manual_seed(0)
    ours = T5(cfg).train()
    hf_cfg = HFConfig(**{k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures",)})
    hf = T5ForConditionalGeneration(hf_cfg).train()
    print(f"params: ours {ours.num_params():,}  HF {sum(p.numel() for p in hf.parameters()):,}  "
          f"threads {torch.get_num_threads()}")
    opts = {"ours": torch.optim.AdamW(ours.parameters(), lr=1e-4, foreach=True),
            "hf": torch.optim.AdamW(hf.parameters(), lr=1e-4, foreach=True)}
    runners = {"ours": lambda b: ours_step(ours, opts["ours"], b), "hf": lambda b: hf_step(hf, opts["hf"], b)}
    ratios = {}
    for dtype in args.dtypes.split(","):
        batch_size, n_steps, n_warmup = args.batch, steps, warmup
        if dtype == "bf16" and not precision.native_bf16():
            batch_size, n_steps, n_warmup = 1, 1, 1
            print("bf16: this CPU has no native bf16 (no AMX/AVX512-BF16), PyTorch emulates it and it is far slower "
                  "than fp32 here; measuring bf16 at batch 1, one timed step (training uses precision='auto' = fp32)")
        batch = make_batch(cfg, batch_size, args.inputs, args.targets)
        tokens = batch_size * (args.inputs + args.targets)
        flops = batch_size * ours.training_flops(args.inputs, args.targets)
        sec = measure(n_steps, n_warmup, batch, runners, dtype)
        ours_tps, hf_tps = tokens / sec["ours"], tokens / sec["hf"]
        ratios[dtype] = ours_tps / hf_tps
        print(f"{dtype} (batch {batch_size}): ours {ours_tps:8.0f} tokens/s ({flops / sec['ours'] / 1e9:6.1f} "
              f"GFLOP/s)   HF {hf_tps:8.0f} tokens/s   ratio {ratios[dtype]:.2f}", flush=True)
    for dtype, r in ratios.items():
        print(f"ratio_{dtype}={r:.3f}")


if __name__ == "__main__":
    main()
