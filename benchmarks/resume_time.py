"""Resume time does not grow with the steps trained: `mtp train` resumed after few steps and after many.

Two runs of the demo's tiny model on span corruption mixed with GLUE (packed, 128/32, batch 8) are trained to a
checkpoint, one at `--short` steps and one at `--long`; each is then resumed for one more step in a fresh process,
timed from the process's start to its exit (model, optimizer and data iterator restored, one step, a checkpoint
written), the two runs' resumes alternating. The data iterator's position is restored from its saved state, not by
replaying the stream, so the two should match.

    python benchmarks/resume_time.py [--short 10] [--long 400]

Needs MTP_DATA_DIR and MTP_VOCAB. The last line is `resume_ratio=<long / short>` (target: under 1.2).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness  # benchmarks/harness.py: Python puts the script's directory first on the path

REPO = Path(__file__).resolve().parents[1]


def train(model_dir: Path, steps: int, checkpoint_every: int) -> float:
    """Seconds `mtp train` takes to reach `steps` in `model_dir` (resuming where it holds a checkpoint)."""
    began = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "mtplatform.cli", "train", "--gin_file=gin/models/tiny.gin",
         "--gin_file=gin/runs/pretrain.gin", "--gin.MIXTURE_OR_TASK_NAME='span_corruption_and_glue'",
         f"--gin.TRAIN_STEPS={steps}", f"--gin.MODEL_DIR='{model_dir}'", "--gin.BATCH_SIZE=8",
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 128, 'targets': 32}",
         f"--gin.train.checkpoint_every={checkpoint_every}", "--gin.train.log_every=1",
         "--gin.train.precision='fp32'"],
        cwd=REPO, capture_output=True, text=True, check=False, env=os.environ)
    if out.returncode != 0:
        raise SystemExit(f"mtp train failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - began


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--short", type=int, default=10)
    p.add_argument("--long", type=int, default=400)
    p.add_argument("--repeats", type=int, default=3, help="resumes timed per run, alternating (the fastest counts)")
    args = p.parse_args()
    print(f"machine: {harness.machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {steps: Path(tmp) / f"run{steps}" for steps in (args.short, args.long)}
        for steps, model_dir in dirs.items():
            print(f"trained to step {steps} in {train(model_dir, steps, checkpoint_every=steps):.0f} s", flush=True)
        times: dict[int, list[float]] = {steps: [] for steps in dirs}
        for i in range(args.repeats):  # alternating, so that the machine's drift falls on both runs alike
            for steps, model_dir in dirs.items():
                times[steps].append(train(model_dir, steps + 1 + i, checkpoint_every=1))
        for steps, seconds in times.items():
            print(f"resumed after step {steps} for one step: " + ", ".join(f"{t:.1f} s" for t in seconds))
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak memory {peak:,.0f} MiB (the largest process)")
    print(f"resume_ratio={min(times[args.long]) / min(times[args.short]):.3f}")


if __name__ == "__main__":
    main()
