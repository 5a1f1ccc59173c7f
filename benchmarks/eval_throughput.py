"""Evaluating a whole validation set, timed: seqio's Evaluator with our decoding against transformers' `generate`.

What `mtp eval` does, from the task's files to its metrics: seqio preprocesses the split, our `predict_fn` decodes
every example in batches, seqio postprocesses and scores. The peer runs the same Evaluator with Hugging Face's
`generate` on the same weights as the decoder, so that the difference is the decoding alone; both must give the same
metrics. Each side runs in its own process, alternating over rounds (`harness.py`); the script prints seconds per
evaluation, examples per second, and the share of it spent decoding.

    python benchmarks/eval_throughput.py [--quick] [--task glue_sst2] [--model mini] [--max_decode_length 8]
                                         [--inputs 128] [--targets 8] [--num_examples N] [--batch 32]

Randomly initialised weights (seed 0) never emit EOS early, so every batch decodes `--max_decode_length` positions:
a trained classifier stops after two or three. Needs MTP_DATA_DIR and MTP_VOCAB. The last line is
`ratio_eval=<ours/HF, median examples per second>`; before it, `target_nll_over_decoding`: the seconds of the
teacher-forced scoring that gives `target_nll` and the label figures over the seconds of decoding, ours. Ours
scores each batch on the encoder output and cross-attention keys and values its decoding computed (so the encoder
counts as decoding's); the peer's scoring encodes each batch again. Ours batches the examples by input length,
each batch trimmed to its longest row (`mtplatform/length_batches.py`); the peer, as a seqio predict function
does, takes them in seqio's order, padded to the task's length. A third side, ours in seqio's order
(`--side ours_in_order`), says how much of the ratio that is: `length_batching_speedup=<ours/ours in seqio's
order>`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import harness  # benchmarks/harness.py: Python puts the script's directory first on the path
import torch

REPO = Path(__file__).resolve().parents[1]
SIDES = {"ours": "ours", "ours_in_order": "ours, seqio's order", "hf": "HF"}


def build_model(name: str, task: str):
    """Our T5 of `gin/models/NAME.gin` with the task's vocabulary, seeded."""
    import gin

    from mtplatform import model as model_lib
    from mtplatform.train import vocab_size_for

    gin.add_config_file_search_path(str(REPO / "gin"))
    gin.parse_config_file(str(REPO / "gin" / "models" / f"{name}.gin"))
    torch.manual_seed(0)
    return model_lib.T5(model_lib.T5Config(vocab_size=vocab_size_for(task))).eval()


def side(args: argparse.Namespace) -> None:
    """One whole evaluation in this process, timed; the seconds inside the decoder are counted apart."""
    import tasks  # noqa: F401  (registers the catalogue)
    from mtplatform import evaluate
    from mtplatform.huggingface import to_hf_state_dict
    from mtplatform.tf_setup import configure_tensorflow

    configure_tensorflow()
    model = build_model(args.model, args.task)
    decoder = None  # ours: `mtp eval`'s own path, scoring on the encoder pass decoding made
    by_length = args.side == "ours"  # the peer and ours_in_order: seqio's order and padding
    if args.side == "hf":
        hf = harness.hf_t5(model.cfg).eval()  # its two embed_tokens are `shared`: loaded with it
        missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
        if unexpected or set(missing) - {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}:
            raise SystemExit(f"weights did not map onto transformers' T5: missing {missing}, unexpected {unexpected}")

        def decoder(enc, max_length, num_beams):
            return hf.generate(input_ids=enc, attention_mask=enc != 0, max_new_tokens=max_length,
                               num_beams=num_beams, do_sample=False)[:, 1:]

    predicting_s, scoring_s, examples = _time_predicting_and_scoring(evaluate)
    began = time.perf_counter()
    metrics = evaluate.evaluate(model, args.task, task_feature_lengths={"inputs": args.inputs, "targets": args.targets},
                                num_examples=args.num_examples,
                                batch_size=args.batch, max_decode_length=args.max_decode_length, generate=decoder,
                                by_length=by_length)
    seconds = time.perf_counter() - began
    harness.report_side([seconds], decoding_s=predicting_s[0] - scoring_s[0], scoring_s=scoring_s[0],
                        examples=examples[0], metrics=metrics)


def _time_predicting_and_scoring(evaluate) -> tuple[list[float], list[float], list[int]]:
    """Counters filled while `evaluate` runs: seconds in the predict functions seqio calls (decoding, and the
    teacher-forced scoring fed from it), seconds in the scoring alone, and examples scored (every one, once)."""
    predicting_s, scoring_s, examples = [0.0], [0.0], [0]
    add, make_predict_fn = evaluate.scoring.Scorer.add, evaluate.make_predict_fn

    def timed_add(scorer, indices, features, memory=None, cross=None):
        began = time.perf_counter()
        add(scorer, indices, features, memory, cross)
        scoring_s[0] += time.perf_counter() - began
        examples[0] += len(indices)

    def timed_make_predict_fn(*args, **kwargs):
        predict_fn = make_predict_fn(*args, **kwargs)

        def timed(*a):
            began = time.perf_counter()
            out = predict_fn(*a)
            predicting_s[0] += time.perf_counter() - began
            return out

        return timed

    evaluate.scoring.Scorer.add, evaluate.make_predict_fn = timed_add, timed_make_predict_fn
    return predicting_s, scoring_s, examples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 round per side instead of 2")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--task", default="glue_sst2")
    p.add_argument("--model", default="mini", help="a gin/models/ file: tiny, mini, small, ...")
    p.add_argument("--inputs", type=int, default=128)
    p.add_argument("--targets", type=int, default=8)
    p.add_argument("--num_examples", type=int, default=None, help="the first N validation examples (default all)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max_decode_length", type=int, default=8)
    p.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        return side(args)
    if args.quick:
        args.rounds = 1
    print(f"machine: {harness.machine()}")
    print(f"{args.task} validation ({args.num_examples or 'all'} examples), gin/models/{args.model}.gin, inputs "
          f"{args.inputs}, targets {args.targets}, batch {args.batch}, up to "
          f"{args.max_decode_length} decoded positions, fp32; each side in its own process", flush=True)
    got = harness.run_sides(__file__, list(SIDES), args.rounds,
                            ["--task", args.task, "--model", args.model, "--inputs", str(args.inputs), "--targets",
                             str(args.targets), "--batch", str(args.batch), "--max_decode_length",
                             str(args.max_decode_length)]
                            + (["--num_examples", str(args.num_examples)] if args.num_examples else []))
    _check_same_metrics(got)
    examples = got["ours"]["examples"]
    medians = {}
    for name, label in SIDES.items():
        best, medians[name] = harness.rates(examples, got[name]["seconds"])
        print(f"eval {label:>20}: {examples / medians[name]:5.1f} s per evaluation of {examples} examples (median), "
              f"{medians[name]:6.1f} examples/s, {got[name]['decoding_s'] / got[name]['seconds'][-1]:.0%} of it "
              f"decoding (last round), peak memory {got[name]['peak_mib']:,.0f} MiB")
    print(f"teacher-forced scoring (target NLL, label figures): {got['ours']['scoring_s']:.2f} s, decoding "
          f"{got['ours']['decoding_s']:.2f} s (ours, last round)")
    print(f"target_nll_over_decoding={got['ours']['scoring_s'] / got['ours']['decoding_s']:.3f}")
    print(f"length_batching_speedup={medians['ours'] / medians['ours_in_order']:.3f}")
    print(f"ratio_eval={medians['ours'] / medians['hf']:.3f}")


def _check_same_metrics(got: dict[str, dict]) -> None:
    """The decoders must agree: the same metrics exactly against the peer in the same order, and to float rounding
    against ours by length (batches of other widths round otherwise)."""
    ours, in_order, hf = (got[name]["metrics"] for name in SIDES)
    if in_order != hf:
        raise SystemExit(f"the metrics differ, so the decoders did not agree: ours {in_order}, HF {hf}")
    far = {task: metrics for task, metrics in ours.items()
           if any(abs(value - in_order[task][name]) > 1e-5 * max(1.0, abs(value)) for name, value in metrics.items())}
    if far or ours.keys() != in_order.keys():
        raise SystemExit(f"batching by length changed the metrics: {ours} against {in_order} in seqio's order")
    print(f"same metrics: {hf}")


if __name__ == "__main__":
    main()
