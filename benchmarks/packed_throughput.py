"""Useful tokens per second on real data: our packed batches against Hugging Face on the same examples, padded.

The mixture `span_corruption_and_glue` (span corruption over the shipped corpus with the GLUE tasks), inputs 512 and
targets 114, batch 8 rows, T5 1.1 small shape, AdamW (fused), in the precision `mtp train` picks here
(`--precision auto`: bf16 autocast where bf16 is native, on every side). Our side trains on the batches
`mtp train` reads (`data.train_dataset`, packed: several examples per row, attention kept within each). The peer
trains `T5ForConditionalGeneration`, from the same starting weights (`harness.hf_t5`), on the same mixture's
examples unpacked, each batch padded to its longest example (as transformers' `DataCollatorForSeq2Seq` pads),
labels -100 on padding. A useful token is an input or target token that
is not padding; each side counts its own. Each side runs in its own process, alternating over rounds (`harness.py`).

Our process keeps the memory it frees (`mtplatform.allocator`, as every `mtp` command that computes does); the peer's
runs as a transformers script does. A third side, the peer with the same allocator setting, says how much of the
ratio that setting is: `ratio_useful_same_allocator`.

    python benchmarks/packed_throughput.py [--quick] [--rounds R] [--steps N] [--batch B] [--precision P]

Needs MTP_DATA_DIR and MTP_VOCAB. The last lines are `ratio_useful=<ours/HF, useful tokens per second>` and
`ratio_useful_same_allocator=<ours/HF keeping its freed memory too>`.
"""

from __future__ import annotations

import argparse

import harness  # benchmarks/harness.py: Python puts the script's directory first on the path
import model_throughput
import torch

from mtplatform import precision

LENGTHS = {"inputs": 512, "targets": 114}


def batches(pack: bool, batch: int):
    """The mixture's training batches as `mtp train` builds them (packed), or unpacked."""
    import tasks  # noqa: F401  (registers the catalogue)
    from mtplatform import data
    from mtplatform.tf_setup import configure_tensorflow

    configure_tensorflow()
    dataset, _ = data.train_dataset(mixture_or_task_name="span_corruption_and_glue", task_feature_lengths=LENGTHS,
                                    batch_size=batch, pack=pack, seed=0)
    return data.BatchIterator(dataset)


def trimmed(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An unpacked batch padded to its longest input and target, not to the feature lengths, in int64 as
    transformers' collators give it."""
    enc_len = int((batch["encoder_input_tokens"] != 0).sum(1).max())
    tgt_len = int((batch["decoder_target_tokens"] != 0).sum(1).max())
    return {"encoder_input_tokens": batch["encoder_input_tokens"][:, :enc_len].long(),
            "decoder_input_tokens": batch["decoder_input_tokens"][:, :tgt_len].long(),
            "decoder_target_tokens": batch["decoder_target_tokens"][:, :tgt_len].long()}


def useful(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["encoder_input_tokens"] != 0).sum() + (batch["decoder_target_tokens"] != 0).sum())


def side(args: argparse.Namespace) -> None:
    """One side: warm-up steps, then timed steps on the next batches; seconds and useful tokens per step."""
    from mtplatform.model import T5

    harness.set_allocator(args.side)
    cfg = model_throughput.model_config()
    torch.manual_seed(0)
    stream = batches(pack=args.side == "ours", batch=args.batch)
    if args.side == "ours":
        model = T5(cfg).train()

        def loss(batch):
            total, weight = model.loss(batch)
            return total / weight
    else:
        model = harness.hf_t5(cfg, like=T5(cfg)).train()

        def loss(batch):
            labels = batch["decoder_target_tokens"].masked_fill(batch["decoder_target_tokens"] == 0, -100)
            return model(input_ids=batch["encoder_input_tokens"], attention_mask=batch["encoder_input_tokens"] != 0,
                         decoder_input_ids=batch["decoder_input_tokens"], labels=labels).loss
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    counts, widths = [], []

    def step():
        batch = next(stream)
        batch = batch if args.side == "ours" else trimmed(batch)
        counts.append(useful(batch))
        widths.append(batch["encoder_input_tokens"].shape[1])
        with precision.autocast(args.precision):
            value = loss(batch)
        value.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = harness.time_steps(step, args.warmup, args.steps)
    # per useful token, so that the parent's median over steps of all rounds is a median rate
    harness.report_side([s / n for s, n in zip(seconds, counts[args.warmup:], strict=True)],
                        useful=counts[args.warmup:], step_seconds=seconds, widths=widths[args.warmup:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 round of 3 timed steps per side")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    # Four: a process that keeps its freed memory stops faulting pages in from about the fifth step (measured: 630k,
    # 180k, 57k, 57k, then no faults per step), and a run's thousands of steps are that steady state.
    p.add_argument("--warmup", type=int, default=4, help="untimed steps per side and round")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--precision", default="auto", help="fp32, bf16, or auto (bf16 where it is native)")
    p.add_argument("--side", choices=list(harness.SIDES), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        return side(args)
    if args.quick:
        args.rounds, args.steps = 1, 3
    args.precision = precision.resolve(args.precision)
    print(f"machine: {harness.machine()}")
    print(f"span_corruption_and_glue, 512/114, batch {args.batch} rows, T5 1.1 small shape, {args.precision}; "
          f"ours packed, HF padded to each batch's longest example; {args.rounds} rounds of {args.steps} timed "
          "steps", flush=True)
    got = harness.run_sides(__file__, list(harness.SIDES), args.rounds,
                            ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
                             "--precision", args.precision],
                            unit="per useful token (last step)")
    rates = {}
    capacity = args.batch * (LENGTHS["inputs"] + LENGTHS["targets"])
    for name, label in harness.SIDES.items():
        best, rates[name] = harness.rates(1.0, got[name]["seconds"])
        tokens, seconds = got[name]["useful"], got[name]["step_seconds"]  # the last round's
        print(f"{label:>21}: {rates[name]:6.0f} useful tokens/s median, {best:6.0f} best; last round: "
              f"{sum(tokens) / len(tokens) / capacity:.0%} of a full 512/114 batch useful, input widths "
              f"{got[name]['widths']}, {sum(seconds) / len(seconds):.2f} s per step; peak memory "
              f"{got[name]['peak_mib']:,.0f} MiB")
    print(f"ratio_useful={rates['ours'] / rates['hf']:.3f}")
    print(f"ratio_useful_same_allocator={rates['ours'] / rates['hf_kept']:.3f}")


if __name__ == "__main__":
    main()
