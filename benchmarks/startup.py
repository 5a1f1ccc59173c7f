"""Seconds for `mtp` commands that need no TensorFlow to start, and to finish on small inputs.

    python benchmarks/startup.py [--rounds 3]

Each command runs as a fresh process, `--rounds` times; the figure is the fastest (the machine's noise only ever adds
time). Measured:
- `mtp --help`;
- `mtp report` of a directory that is not an experiment: everything a report pays before reading its runs (Python,
  argument parsing, the report's imports), then its one-line error;
- `mtp report` of a copy of a committed report (`results/objectives`: 14 arms, 2 seeds, 6 plots) from start to end;
- `mtp export` of a mini model's checkpoint (random weights) to a Hugging Face directory, from start to end;
- `mtp tasks list`, a command that does read data, for comparison (TensorFlow and seqio load);
- the end of a command that loaded TensorFlow and torch: a 5-step `mtp train` of the tiny model on RTE, seconds from
  its last line to its exit, against the same command with the interpreter's last garbage collection kept
  (`cli.skip_the_last_collection` undone: what every command paid before it);
- the peers: `python -c "import torch"` (what any command that loads torch pays at least; export reads and writes
  the weights as numpy arrays and does not) and `python -c pass`.
Needs MTP_DATA_DIR (for `tasks list` and the training) and MTP_VOCAB or --vocab (for export and the training).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness

ROOT = Path(__file__).resolve().parents[1]
MTP = [sys.executable, "-m", "mtplatform.cli"]


def fastest(command: list[str], rounds: int, ok: tuple[int, ...] = (0,)) -> float:
    """Seconds of the fastest of `rounds` runs of `command`; an error if it exits with another status."""
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        times.append(time.perf_counter() - began)
        if done.returncode not in ok:
            sys.exit(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()[-400:]}")
    return min(times)


TRAIN = ["train", "--gin_file=gin/models/tiny.gin", "--gin_file=gin/runs/pretrain.gin",
         "--gin.MIXTURE_OR_TASK_NAME='glue_rte'", "--gin.BATCH_SIZE=4",
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 8}", "--gin.train.precision='fp32'",
         "--gin.TRAIN_STEPS=5"]
WITH_LAST_COLLECTION = [sys.executable, "-c", "import sys; from mtplatform import cli; "
                        "cli.skip_the_last_collection = lambda: None; sys.exit(cli.main())"]


def exit_seconds(command: list[str], model_dir: Path, vocab: str) -> float:
    """Seconds from the last line of a fresh `command` training into `model_dir` to the end of its process."""
    shutil.rmtree(model_dir, ignore_errors=True)
    process = subprocess.Popen([*command, *TRAIN, f"--gin.MODEL_DIR='{model_dir}'"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=ROOT, env={**os.environ, "MTP_VOCAB": vocab})
    last = time.perf_counter()
    output = []
    for line in process.stdout:  # tqdm's bar redraws with \r: only the summary ends with a newline of its own
        last = time.perf_counter()
        output.append(line)
    if process.wait() != 0:
        sys.exit(f"{' '.join(command)} train exited {process.returncode}: {''.join(output)[-400:]}")
    return time.perf_counter() - last


def mini_checkpoint(directory: Path, vocab: Path) -> Path:
    """A checkpoint directory (weights and meta.json, as training writes them) of the mini model for `vocab`."""
    import gin
    import sentencepiece

    from mtplatform import checkpoints
    from mtplatform import model as model_lib

    gin.parse_config_file(str(ROOT / "gin" / "models" / "mini.gin"))
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(vocab)).get_piece_size()
    cfg = model_lib.T5Config(vocab_size=pieces + 100)
    ckpt = checkpoints.checkpoint_dir(directory, 1)
    ckpt.mkdir(parents=True)
    checkpoints.save_model(model_lib.T5(cfg), ckpt / checkpoints.MODEL)
    checkpoints.write_meta(ckpt, 1, 1, None, True)
    return ckpt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vocab", default=os.environ.get("MTP_VOCAB"))
    args = parser.parse_args()
    if not args.vocab:
        sys.exit("startup.py needs a SentencePiece model: --vocab or MTP_VOCAB")
    print(harness.machine())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        report_copy = tmp / "objectives"
        shutil.copytree(ROOT / "results" / "objectives", report_copy)
        ckpt = mini_checkpoint(tmp / "run", Path(args.vocab))
        figures = {
            "python_s": fastest([sys.executable, "-c", "pass"], args.rounds),
            "import_torch_s": fastest([sys.executable, "-c", "import torch"], args.rounds),
            "help_s": fastest([*MTP, "--help"], args.rounds),
            "report_start_s": fastest([*MTP, "report", str(tmp)], args.rounds, ok=(2,)),
            "report_whole_s": fastest([*MTP, "report", str(report_copy)], args.rounds),
            "export_whole_s": fastest([*MTP, "export", f"--checkpoint={ckpt}", f"--output={tmp / 'hf'}",
                                       f"--vocab={args.vocab}", "--overwrite"], args.rounds),
            "tasks_list_s": fastest([*MTP, "tasks", "list"], args.rounds),
        }
        ours, kept = [], []
        for _ in range(args.rounds):  # alternating, so that a slower spell of the machine slows both
            ours.append(exit_seconds(MTP, tmp / "train", args.vocab))
            kept.append(exit_seconds(WITH_LAST_COLLECTION, tmp / "train", args.vocab))
        figures["train_exit_s"], figures["train_exit_with_last_collection_s"] = min(ours), min(kept)
    for name, value in figures.items():
        print(f"{name}={value:.2f}")
    print(f"startup_s={max(figures['help_s'], figures['report_start_s'], figures['export_whole_s']):.2f}")
    print(f"export_over_torch={figures['export_whole_s'] / figures['import_torch_s']:.2f}")
    print(f"exit_saved_s={figures['train_exit_with_last_collection_s'] - figures['train_exit_s']:.2f}")


if __name__ == "__main__":
    main()
