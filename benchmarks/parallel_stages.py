"""Wall time of an experiment run with independent stages side by side (`experiment.parallel`) against the same
experiment run one stage at a time, and whether their figures agree.

    python benchmarks/parallel_stages.py [--budget 0.0001220703125] [--parallel 2] [--eval_num_examples 100]
                                         [--rounds 2]

The experiment is `gin/experiments/mixing_strategies.gin` (T5 Table 11's fixed arms and the three online arms, the
mini model, one seed) at a small budget; each side is `mtp experiment` from start to end in its own directory (a stage
process loads TensorFlow as the sequential run does, so neither side has it warm), the sides alternating which goes
first over rounds, so that a slow spell of a shared machine falls on both. The wall times are means over the rounds;
every run's weights and figures are compared with the first sequential run's.
Prints both wall times, `parallel_speedup` (sequential over parallel: target at least 1.3 on 2 cores),
`weights_identical` (1 where every checkpoint is the same bytes) and `figures_largest_relative_difference` (over every
figure, interval and p-value of results.json: 0 where they agree, inf where a non-number differs, such as which arm
is best). Each stage process has the sequential side's threads (`mtplatform/parallel_stages.py` says why), so both
must be identical.
Needs MTP_DATA_DIR and MTP_VOCAB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness

ROOT = Path(__file__).resolve().parents[1]


def experiment(directory: Path, args: argparse.Namespace, parallel: int) -> float:
    """Seconds of one `mtp experiment` run of the benchmark's configuration into `directory`."""
    command = [sys.executable, "-m", "mtplatform.cli", "experiment",
               "--gin_file=gin/experiments/mixing_strategies.gin", f"--gin.EXPERIMENT_DIR='{directory}'",
               f"--gin.BUDGET={args.budget}", f"--gin.BATCH_SIZE={args.batch_size}",
               f"--gin.experiment.eval_num_examples={args.eval_num_examples}", "--gin.experiment.evals_per_stage=1",
               f"--gin.PARALLEL={parallel}"]
    began = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        sys.exit(f"parallel={parallel}: exit {done.returncode}: {done.stderr.strip()[-1500:]}")
    stages = done.stderr.count("experiment: stage")
    print(f"parallel={parallel}: {seconds:,.1f} s ({stages} stage lines)", flush=True)
    return seconds


def weights_identical(a: Path, b: Path) -> bool:
    """Whether every checkpoint's weights are the same bytes in both experiment directories."""
    files = sorted(p.relative_to(a) for p in a.glob("*/seed_*/checkpoint_*/model.safetensors"))
    return bool(files) and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def largest_difference(x, y) -> float:
    """The largest relative difference between two results' numbers (inf where their shapes differ)."""
    if isinstance(x, dict) and isinstance(y, dict) and x.keys() == y.keys():
        return max((largest_difference(x[k], y[k]) for k in x), default=0.0)
    if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
        return max((largest_difference(a, b) for a, b in zip(x, y, strict=True)), default=0.0)
    if isinstance(x, float | int) and isinstance(y, float | int) and not isinstance(x, bool):
        if x == y or (x != x and y != y):  # equal, or both NaN (a correlation of constant predictions)
            return 0.0
        return abs(x - y) / max(abs(x), abs(y))
    return 0.0 if x == y else float("inf")


def figures(directory: Path) -> list:
    """results.json's arms without the experiment's path and its wall times."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "seconds"}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value.replace(str(directory), "EXPERIMENT_DIR") if isinstance(value, str) else value

    return strip(json.loads((directory / "results.json").read_text())["arms"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=2 ** -13, help="BUDGET: 2**-13 is 96 steps per arm")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--eval_num_examples", type=int, default=100)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of both sides, alternating which goes first")
    args = parser.parse_args()
    print(harness.machine())
    seconds: dict[int, list[float]] = {1: [], args.parallel: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for parallel in (1, args.parallel) if r % 2 == 0 else (args.parallel, 1):
                directory = Path(tmp) / f"parallel_{parallel}_round_{r}"
                seconds[parallel].append(experiment(directory, args, parallel))
        first, *others = sorted(Path(tmp).iterdir(), key=lambda d: (d.name != "parallel_1_round_0", d.name))
        same_weights = all(weights_identical(first, d) for d in others)
        difference = max(largest_difference(figures(first), figures(d)) for d in others)
    sequential, parallel = sum(seconds[1]), sum(seconds[args.parallel])
    print(f"sequential_s={sequential / args.rounds:.1f}")
    print(f"parallel_s={parallel / args.rounds:.1f}")
    print(f"weights_identical={int(same_weights)}")
    print(f"figures_largest_relative_difference={difference:.3g}")
    print(f"parallel_speedup={sequential / parallel:.3f}")


if __name__ == "__main__":
    main()
