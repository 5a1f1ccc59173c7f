"""How long the trainer waits for batches: `mtp train` on span corruption mixed with GLUE, packing on.

Runs the real command (`gin/runs/pretrain.gin`: 512 input and 114 target tokens, packed) for a few hundred steps
and reads `data_wait_fraction` from its metrics.jsonl: the share of each logging window spent in `next()` on the
batch stream (tf.data's pipeline, the seqio mixture, packing, the numpy-to-torch handover). The first window is
reported apart: it holds the pipeline's start (reading files, filling the shuffle buffer). The smaller the model,
the faster the steps and the harder the test; the default is the demo's tiny model at batch 32.

    python benchmarks/input_pipeline.py [--quick] [--model gin/models/tiny.gin] [--batch 32] [--online]

Needs MTP_DATA_DIR and MTP_VOCAB. Prints `data_wait_fraction=<mean over windows after the first>`, and with
`--online` also `data_wait_fraction_online=` for the same run with online mixing (`mixing.strategy = 'online'`,
ODM updating the shares every step), whose batches are drawn and packed in numpy when the step asks for them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness  # benchmarks/harness.py: Python puts the script's directory first on the path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="60 steps instead of 300")
    p.add_argument("--model", default="gin/models/tiny.gin")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--mixture", default="span_corruption_and_glue")
    p.add_argument("--online", action="store_true",
                   help="also an online-mixing run (ODM, shares updated every step: mtplatform.online_stream)")
    args = p.parse_args()
    steps, log_every = (60, 10) if args.quick else (300, 25)
    print(f"machine: {harness.machine()}")
    runs = {"": []}
    if args.online:
        runs["_online"] = ["--gin.mixing.strategy='online'"]
    for suffix, extra in runs.items():
        _report(args, steps, log_every, suffix, extra)


def _report(args, steps: int, log_every: int, suffix: str, extra: list[str]) -> None:
    """Train once (fixed rates, or online with `extra`) and print its waiting figures, the last as name=value."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-m", "mtplatform.cli", "train", f"--gin_file={args.model}",
             "--gin_file=gin/runs/pretrain.gin", f"--gin.MIXTURE_OR_TASK_NAME='{args.mixture}'",
             f"--gin.TRAIN_STEPS={steps}", f"--gin.MODEL_DIR='{tmp}'", f"--gin.BATCH_SIZE={args.batch}",
             f"--gin.train.log_every={log_every}", f"--gin.train.checkpoint_every={steps}", *extra],
            cwd=REPO, capture_output=True, text=True, check=False, env=os.environ)
        if out.returncode != 0:
            raise SystemExit(f"mtp train failed:\n{out.stderr[-3000:]}")
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        wall = time.perf_counter() - start
    first, rest = rows[0], rows[1:]
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    mixing = "online mixing (ODM)" if suffix else "fixed rates"
    print(f"{args.model}, batch {args.batch}, {args.mixture} at {mixing}, 512/114 packed, {steps} steps in "
          f"{wall:.0f} s (process included), peak memory {peak:,.0f} MiB")
    print(f"first window (steps 1-{log_every}, pipeline start included): waiting {first['data_wait_fraction']:.1%}")
    waits = [r["data_wait_fraction"] for r in rest]
    print(f"later windows: waiting {statistics.mean(waits):.2%} on average, at most {max(waits):.2%}; "
          f"{statistics.mean(r['tokens_per_second'] for r in rest):.0f} tokens/s")
    print(f"data_wait_fraction{suffix}={statistics.mean(waits):.4f}")


if __name__ == "__main__":
    main()
