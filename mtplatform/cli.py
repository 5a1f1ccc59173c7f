"""The `mtp` command: tasks, vocab (and the training commands as they land).

    mtp tasks list [--module my_tasks]
    mtp tasks show --mixture_or_task=glue_sst2 [--split=validation] [--n=2]
    mtp vocab train --mixture_or_task=glue_sst2 --vocab_size=8000 --output=vocab/mtp.model
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mtplatform.tf_setup import configure_tensorflow


def _add_module_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--module", action="append", default=[],
                   help="Python module that registers tasks or mixtures; repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtp", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    tasks = commands.add_parser("tasks", help="list registered tasks, or show examples of one")
    tasks_cmd = tasks.add_subparsers(dest="tasks_command", required=True)
    lst = tasks_cmd.add_parser("list", help="every task with its splits, example counts and metrics")
    _add_module_flag(lst)
    show = tasks_cmd.add_parser("show", help="print tokenized examples of a task or of each task of a mixture")
    _add_module_flag(show)
    show.add_argument("--mixture_or_task", required=True)
    show.add_argument("--split", default="train")
    show.add_argument("--n", type=int, default=1, help="examples per task")
    show.add_argument("--inputs_length", type=int, default=512)
    show.add_argument("--targets_length", type=int, default=128)

    vocab = commands.add_parser("vocab", help="SentencePiece vocabulary")
    vocab_cmd = vocab.add_subparsers(dest="vocab_command", required=True)
    train = vocab_cmd.add_parser("train", help="train a unigram model with T5's ids on the text of tasks")
    _add_module_flag(train)
    train.add_argument("--mixture_or_task", required=True, help="task or mixture whose training text to use")
    train.add_argument("--vocab_size", type=int, required=True, help="total ids, the 100 sentinels included")
    train.add_argument("--output", required=True, help="path of the .model file to write")
    train.add_argument("--split", default="train")
    train.add_argument("--max_examples_per_task", type=int, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_tensorflow()
    from mtplatform import catalog

    try:
        catalog.import_modules(args.module)
        if args.command == "tasks" and args.tasks_command == "list":
            return _tasks_list()
        if args.command == "tasks" and args.tasks_command == "show":
            return _tasks_show(args)
        if args.command == "vocab" and args.vocab_command == "train":
            return _vocab_train(args)
    except (FileNotFoundError, ValueError, ModuleNotFoundError) as e:
        print(f"mtp: error: {e}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled command {args}")


def _tasks_list() -> int:
    import seqio

    from mtplatform import catalog

    rows = []
    for name in sorted(seqio.TaskRegistry.names()):
        s = catalog.summarize(seqio.get_mixture_or_task(name))
        splits = ", ".join(f"{k} {v:,}" if v is not None else f"{k} ?" for k, v in s.splits.items())
        missing = f"  (no data files for: {', '.join(s.missing_files)})" if s.missing_files else ""
        rows.append((name, splits, (", ".join(s.metrics) or "-") + missing))
    width = [max(len(r[i]) for r in rows) for i in range(2)]
    print(f"{'task':<{width[0]}}  {'splits (examples)':<{width[1]}}  metrics")
    for name, splits, metrics in rows:
        print(f"{name:<{width[0]}}  {splits:<{width[1]}}  {metrics}")
    mixtures = sorted(seqio.MixtureRegistry.names())
    if mixtures:
        print("\nmixtures: " + ", ".join(mixtures))
    return 0


def _tasks_show(args: argparse.Namespace) -> int:
    from mtplatform import catalog

    lengths = {"inputs": args.inputs_length, "targets": args.targets_length}
    for task in catalog.tasks_of(args.mixture_or_task):
        split = args.split if args.split in task.splits else task.splits[0]
        ds = task.get_dataset(lengths, split=split, shuffle=False, use_cached=False, seed=0)
        for ex in ds.take(args.n).as_numpy_iterator():
            print(f"== {task.name} ({split})")
            for key in ("inputs", "targets"):
                if key in ex:
                    vocab = task.output_features[key].vocabulary
                    ids = ex[key].tolist()
                    print(f"  {key} text:   {vocab.decode(ids)}")
                    print(f"  {key} ids:    {ids[:40]}{' ...' if len(ids) > 40 else ''} ({len(ids)} tokens)")
    return 0


def _vocab_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mtplatform import catalog
    from mtplatform.vocab import train_vocabulary

    def texts():
        for task in catalog.tasks_of(args.mixture_or_task):
            split = args.split if args.split in task.splits else "train"
            yield from tqdm(catalog.raw_texts(task, split, args.max_examples_per_task),
                            desc=f"reading {task.name}/{split}", unit=" texts", mininterval=2, file=sys.stderr)

    out = train_vocabulary(texts(), vocab_size=args.vocab_size, output=args.output)
    print(f"wrote vocabulary ({args.vocab_size} ids, 100 sentinels) to {Path(out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
