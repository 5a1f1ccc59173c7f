"""Peak memory and time to the first batch when training on the shipped text corpus and on one twenty times larger.

The larger corpus is each file of `text/` written as 20 concatenated copies of itself (about 200 MB). Each size runs
in its own process, which builds the training stream of span corruption over the corpus (`mtplatform.data`:
shuffled, packed, batched, as `mtp train` does) and draws `--batches` batches of 16 rows; the process reports its
peak resident memory and the seconds to its first batch. A corpus streamed from disk gives flat figures; one read
into memory gives figures that grow with it.

    python benchmarks/corpus_memory.py [--copies 20] [--batches 50]

Needs MTP_DATA_DIR (the shipped data) and MTP_VOCAB (any vocabulary; without it a small one is trained first).
The last lines are `memory_growth_mib=`, `memory_ratio=<peak 20x / peak 1x>` and `first_batch_ratio=<seconds 20x /
1x>`. Measured on 2 AMD EPYC cores (AVX2): 1,134 and 1,121 MiB, first batch after 8.7 and 9.1 s (ratios 0.989,
1.047); the same script at commit 6eca367, which read the corpus into Python lists, gave 1,136 and 1,688 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness  # benchmarks/harness.py: Python puts the script's directory first on the path


def child(corpus: Path, batches: int) -> None:
    """In a fresh process: the training stream over `corpus`, its peak memory and time to the first batch."""
    from mtplatform.tf_setup import configure_tensorflow

    configure_tensorflow()
    from mtplatform import data
    from tasks.unsupervised import register_text_tasks

    register_text_tasks("bench", [str(corpus / "**" / "*.txt")])
    start = time.perf_counter()
    ds, _ = data.train_dataset(mixture_or_task_name="bench_span_corruption",
                               task_feature_lengths={"inputs": 512, "targets": 114}, batch_size=16)
    it = iter(ds)
    next(it)
    first = time.perf_counter() - start
    for _ in range(batches - 1):
        next(it)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"first_batch_s": first, "peak_mib": peak_mib, "seconds": time.perf_counter() - start}))


def make_corpus(source: Path, target: Path, copies: int) -> int:
    """`target` holds each file of `source` as `copies` concatenated copies; returns its size in bytes."""
    size = 0
    for path in sorted(source.glob("**/*.txt")):
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        content = path.read_bytes()
        with open(out, "wb") as f:
            for _ in range(copies):
                f.write(content if content.endswith(b"\n") else content + b"\n")
        size += out.stat().st_size
    return size


def run_child(corpus: Path, batches: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(corpus), "--batches", str(batches)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"benchmark process for {corpus} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copies", type=int, default=20)
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(Path(args.child), args.batches)
    data_dir = Path(os.environ.get("MTP_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not os.environ.get("MTP_VOCAB"):
            os.environ["MTP_VOCAB"] = str(_small_vocab(data_dir, tmp))
        sizes = {1: make_corpus(data_dir / "text", tmp / "x1", 1),
                 args.copies: make_corpus(data_dir / "text", tmp / f"x{args.copies}", args.copies)}
        print(f"machine: {harness.machine()}")
        print(f"span corruption, 512/114 tokens, batch 16, {args.batches} batches")
        results = {}
        for copies, size in sizes.items():
            results[copies] = run_child(tmp / f"x{copies}", args.batches)
            r = results[copies]
            print(f"corpus x{copies:<3} {size / 2**20:7.1f} MiB: peak memory {r['peak_mib']:7.0f} MiB, first batch "
                  f"after {r['first_batch_s']:5.1f} s, {args.batches} batches in {r['seconds']:5.1f} s")
    big = results[args.copies]
    # The ratio includes TensorFlow's own ~1.1 GB in both; the growth in MiB is the corpus's share, if any.
    print(f"memory_growth_mib={big['peak_mib'] - results[1]['peak_mib']:.0f}")
    print(f"memory_ratio={big['peak_mib'] / results[1]['peak_mib']:.3f}")
    print(f"first_batch_ratio={big['first_batch_s'] / results[1]['first_batch_s']:.3f}")


def _small_vocab(data_dir: Path, tmp: Path) -> Path:
    from mtplatform.vocab import train_vocabulary

    lines = (line for path in sorted((data_dir / "text").glob("**/*.txt"))
             for line in path.read_text(errors="replace").splitlines()[:2000] if line.strip())
    return train_vocabulary(lines, vocab_size=2000, output=tmp / "bench.model")


if __name__ == "__main__":
    main()
