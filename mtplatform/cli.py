"""The `mtp` command.

    mtp tasks list [--module my_tasks]
    mtp tasks show --mixture_or_task=glue_sst2 [--split=validation] [--n=2]
    mtp vocab train --mixture_or_task=glue_sst2 --vocab_size=8000 --output=vocab/mtp.model
    mtp train    --gin_file=gin/models/small.gin --gin_file=gin/runs/pretrain.gin --gin.MODEL_DIR="'/tmp/run'" ...
    mtp finetune --gin_file=gin/models/small.gin --gin_file=gin/runs/finetune.gin --gin.INITIAL_CHECKPOINT_PATH=...
    mtp distill  --gin_file=gin/models/mini.gin --gin_file=gin/runs/distill.gin --gin.TEACHER="'/tmp/run'" ...
    mtp eval     --gin_file=gin/runs/eval.gin --gin.CHECKPOINT_PATH="'/tmp/run'" --gin.MIXTURE_OR_TASK_NAME=...
    mtp infer    --gin_file=gin/runs/infer.gin --gin.CHECKPOINT_PATH=... --gin.OUTPUT_FILE="'/tmp/preds.jsonl'"
    mtp experiment --gin_file=gin/experiments/demo.gin --gin.EXPERIMENT_DIR=...
    mtp report   runs/demo
    mtp export   --checkpoint=/tmp/run --output=/tmp/run_hf
    mtp cache    --mixture_or_task=span_corruption --output_cache_dir=/data/cache [-- BEAM PIPELINE OPTIONS]
    mtp mixture show span_corruption_and_glue [--gin.mixing.strategy="'temperature'" --gin.mixing.temperature=2.0]
    mtp mixture search span_corruption_and_glue --gin.EXPERIMENT_DIR="'runs/search'" [--gin.mixture_search.num_runs=48]

`--debug` anywhere on the line prints an error's traceback as well as its one-line message; `--verbose` shows
TensorFlow's and absl's logs, hidden by default.

Gin overrides follow t5x: `--gin.NAME=VALUE` binds NAME (a macro or `configurable.param`) to a Python literal,
after all --gin_file files. The resolved config is saved as MODEL_DIR/config.gin.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from mtplatform import allocator
from mtplatform.tf_setup import configure_logs, configure_tensorflow


def _add_module_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--module", action="append", default=[],
                   help="Python module that registers tasks or mixtures; repeatable")


def _at_least(low: int):
    """An argparse type: a whole number >= `low` (argparse then names the flag in its one-line error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is not a whole number >= {low}")
        return value
    return parse


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
    show.add_argument("--n", type=_at_least(1), default=1, help="examples per task")
    show.add_argument("--inputs_length", type=_at_least(1), default=512)
    show.add_argument("--targets_length", type=_at_least(1), default=128)

    vocab = commands.add_parser("vocab", help="SentencePiece vocabulary")
    vocab_cmd = vocab.add_subparsers(dest="vocab_command", required=True)
    train = vocab_cmd.add_parser("train", help="train a unigram model with T5's ids on the text of tasks")
    _add_module_flag(train)
    train.add_argument("--mixture_or_task", required=True, help="task or mixture whose training text to use")
    train.add_argument("--vocab_size", type=_at_least(101), required=True, help="total ids, the 100 sentinels included")
    train.add_argument("--output", required=True, help="path of the .model file to write")
    train.add_argument("--split", default="train")
    train.add_argument("--max_examples_per_task", type=_at_least(1), default=None)

    export = commands.add_parser("export", help="write a checkpoint as a Hugging Face T5 directory")
    export.add_argument("--checkpoint", required=True, help="checkpoint_<step> directory, or a model directory")
    export.add_argument("--output", required=True, help="directory to write (config.json, safetensors, spiece.model)")
    export.add_argument("--vocab", help="SentencePiece model the run tokenized with (default: $MTP_VOCAB)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --output directory")
    _add_module_flag(export)

    cache = commands.add_parser("cache", help="preprocess tasks once with seqio's Apache Beam pipeline",
                                description="Caches each task's preprocessing up to its seqio.CacheDatasetPlaceholder. "
                                "Runs read the cache where gin cache.dirs (or $MTP_CACHE_DIR) names the directory. "
                                "Arguments after `--` are Beam pipeline options, passed on unchanged "
                                "(default --runner=DirectRunner).")
    cache.add_argument("--mixture_or_task", required=True, action="append", help="task or mixture; repeatable")
    cache.add_argument("--output_cache_dir", required=True)
    cache.add_argument("--overwrite", action="store_true", help="rebuild caches that exist (stale ones included)")
    cache.add_argument("--min_shards", type=_at_least(1), default=64, help="TFRecord files per split (seqio's default)")
    _add_module_flag(cache)

    rep = commands.add_parser("report", help="rebuild an experiment's results.md/json and plots from its runs")
    rep.add_argument("experiment_dir")
    _add_module_flag(rep)

    mixture = commands.add_parser("mixture", help="a mixture's rates, expected and measured shares")
    mixture_cmd = mixture.add_subparsers(dest="mixture_command", required=True)
    mshow = mixture_cmd.add_parser("show", help="rates, expected and measured shares, epochs per run (--gin. too)")
    _add_module_flag(mshow)
    mshow.add_argument("name", help="mixture (or task) name")
    mshow.add_argument("--gin_file", action="append", default=[], help="run gin file (lengths, steps, batch, mixing)")
    mshow.add_argument("--gin_search_path", action="append", default=[])
    mshow.add_argument("--steps", type=_at_least(1), help="training steps (default: TRAIN_STEPS from the gin files)")
    mshow.add_argument("--batch_size", type=_at_least(1), help="global batch (default: BATCH_SIZE from the gin files)")
    mshow.add_argument("--examples", type=_at_least(1), default=4000, help="examples to draw from the pipeline")
    mshow.add_argument("--inputs_length", type=_at_least(1), help="default: TASK_FEATURE_LENGTHS from gin, else 512")
    mshow.add_argument("--targets_length", type=_at_least(1), help="default: TASK_FEATURE_LENGTHS from gin, else 114")
    mshow.add_argument("--no_pack", action="store_true", help="measure without packing")
    mshow.add_argument("--plot", help="also write a PNG bar chart of configured against measured shares here")
    search = mixture_cmd.add_parser("search", help="propose rates from small proxy runs (RegMix); --gin. too")
    _add_module_flag(search)
    search.add_argument("name", help="mixture whose rates to search (its configured rates are the prior)")
    search.add_argument("--gin_file", action="append", default=[],
                        help="default: gin/experiments/mixture_search.gin (model, proxies, target)")
    search.add_argument("--gin_search_path", action="append", default=[])

    for name, help_text in (("train", "pretrain or train on a task or mixture (resumes from MODEL_DIR)"),
                            ("finetune", "fine-tune INITIAL_CHECKPOINT_PATH with a fresh optimizer"),
                            ("distill", "train a student on a TEACHER's soft targets (gin/runs/distill.gin)"),
                            ("eval", "evaluate a checkpoint with the tasks' metrics"),
                            ("infer", "write predictions as JSON lines"),
                            ("experiment", "run an experiment's arms (stages), evaluate, write its report")):
        cmd = commands.add_parser(name, help=help_text)
        _add_module_flag(cmd)
        cmd.add_argument("--gin_file", action="append", default=[], help="gin file; repeatable, read in order")
        cmd.add_argument("--gin_search_path", action="append", default=[], help="extra directory for gin includes")
        if name in QUANTIZABLE:
            cmd.add_argument("--quantize", choices=["int8"],
                             help="int8 linear layers (PyTorch dynamic quantization), on the CPU; sets "
                                  f"{QUANTIZABLE[name]}.quantize")
    return parser


GIN_DIR = Path(__file__).resolve().parents[1] / "gin"
GIN_COMMANDS = ("train", "finetune", "distill", "eval", "infer", "experiment")
QUANTIZABLE = {"eval": "evaluate_checkpoint", "infer": "infer"}  # command -> the configurable its --quantize sets
ACCEPTS_GIN = (*GIN_COMMANDS, "mixture")
WITHOUT_TENSORFLOW = ("report", "export")  # read run files and checkpoints only: no data, so no TensorFlow or seqio


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def parse_gin(files: list[str], overrides: list[str], search_paths: list[str]) -> None:
    """Read gin files, then `--gin.NAME=VALUE` overrides (t5x style)."""
    import gin

    import mtplatform
    from mtplatform import parallel_stages

    mtplatform.register_configurables()
    parallel_stages.remember_gin(files, overrides, search_paths)  # what an experiment's stage processes parse again
    for path in [*search_paths, str(GIN_DIR), str(GIN_DIR.parent), "."]:
        gin.add_config_file_search_path(path)
    bindings = []
    for item in overrides:
        if not item.startswith("--gin."):
            raise ValueError(f"unrecognised argument {item!r} (gin overrides are --gin.NAME=VALUE)")
        name, sep, value = item[len("--gin."):].partition("=")
        if not sep:
            raise ValueError(f"{item!r}: a gin override needs a value, as in --gin.TRAIN_STEPS=1000")
        bindings.append(f"{name} = {value}")
    # A resource reader that seqio registers with gin logs "Path not found" at ERROR for every search path that
    # does not hold an included file, even when a later one does; a missing file still raises from gin itself.
    quiet = _DropMessages("Path not found:")
    logging.getLogger().addFilter(quiet)
    try:
        gin.parse_config_files_and_bindings(files, [], finalize_config=False)
        for item, binding in zip(overrides, bindings, strict=True):  # one at a time, to name the culprit
            try:
                gin.parse_config(binding)
            except SyntaxError as e:
                raise ValueError(f"{item}: {e.msg or e}; values are Python literals (a string needs quotes: "
                                 f"--gin.NAME=\"'text'\")") from e
    except SyntaxError as e:  # in a gin file: gin names the file and line
        raise ValueError(f"gin: {e}") from e
    finally:
        logging.getLogger().removeFilter(quiet)
    from mtplatform import mixing

    mixing.register_declared()


def _check_required_macros() -> None:
    """Name every run-file macro still bound to %gin.REQUIRED (gin itself would pass a bare sentinel on)."""
    import gin

    missing = []
    for line in gin.config_str().splitlines():
        name, sep, value = line.partition(" = ")
        if sep and name.strip().isupper() and value.strip() == "%gin.REQUIRED":
            missing.append(name.strip())
    if missing:
        flags = " ".join(f"--gin.{m}=..." for m in missing)
        raise ValueError(f"required setting(s) not given: {', '.join(missing)} (pass {flags})")


def main(argv: list[str] | None = None) -> int:
    """Run one command; errors are one line on stderr (the traceback too with --debug) and a non-zero exit:
    2 for bad input, 3 for a diverged run, 128 + the signal for a run stopped by SIGTERM/SIGINT after its
    checkpoint, 1 for anything unforeseen."""
    skip_the_last_collection()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug, verbose = "--debug" in argv, "--verbose" in argv
    argv = [a for a in argv if a not in ("--debug", "--verbose")]
    return guarded(lambda: _dispatch(argv), debug=debug, verbose=verbose)


def skip_the_last_collection() -> None:
    """Let the process end without the interpreter's last garbage collection, 2 to 3 s of every command that loaded
    TensorFlow and torch (`mtp train` of 5 steps on the AVX2 EPYC: its last line to its exit 2.35-3.25 s, 0.33-0.35 s
    this way; all of it in that collection over their millions of objects). Files, checkpoints, logs and
    TensorBoard writers are closed by the code that opened them, not left to the collector; the memory goes back to
    the system with the process. Idempotent; registered first, so it runs after the exit handlers that the command
    registered (atexit runs them last in, first out)."""
    global _last_collection_skipped
    if not _last_collection_skipped:
        atexit.register(gc.freeze)  # frozen objects are outside every generation the collector visits
        _last_collection_skipped = True


_last_collection_skipped = False


def guarded(body: Callable[[], int], debug: bool = False, verbose: bool = False) -> int:
    """`body()`'s exit code, or `main`'s for its errors and signals (shared with an experiment's stage processes)."""
    from mtplatform import interrupts

    try:
        with interrupts.exit_at_once():  # from the start: a signal while TensorFlow loads ends with a line too
            configure_logs(verbose=verbose)
            return body()
    except interrupts.Stopped as e:
        print(f"mtp: {_without_gin_context(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("mtp: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        health = sys.modules.get("mtplatform.health")  # only a run that loaded it can diverge; loading it loads torch
        diverged = health is not None and isinstance(e, health.Diverged)
        known = diverged or isinstance(e, FileNotFoundError | ValueError | ModuleNotFoundError | OSError)
        if known:
            message = _without_gin_context(e)
        else:
            message = f"{type(e).__name__}: {_first_line(e)} (rerun with --debug for the traceback)"
        print(f"mtp: error: {message}", file=sys.stderr)
        return 3 if diverged else 2 if known else 1


def _dispatch(argv: list[str]) -> int:
    argv, passthrough = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args, extra = build_parser().parse_known_args(argv)
    if passthrough and args.command != "cache":
        build_parser().error(f"arguments after `--` are Beam options of `mtp cache`: {' '.join(passthrough)}")
    if extra and args.command not in ACCEPTS_GIN:
        build_parser().error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command not in WITHOUT_TENSORFLOW or args.module:
        allocator.keep_freed_memory()  # before the first tensor: a step's memory is reused, not faulted in again
        configure_tensorflow()
        from mtplatform import catalog

        catalog.import_modules(args.module)
    if getattr(args, "quantize", None):
        extra.append(f"--gin.{QUANTIZABLE[args.command]}.quantize='{args.quantize}'")
    if args.command in GIN_COMMANDS:
        parse_gin(args.gin_file, extra, args.gin_search_path)
        _check_required_macros()
        return _run(args.command)
    if args.command == "mixture" and args.mixture_command == "search":
        parse_gin(args.gin_file or [str(GIN_DIR / "experiments" / "mixture_search.gin")], extra,
                  args.gin_search_path)
        _check_required_macros()
        return _mixture_search(args.name)
    if args.command == "mixture":
        parse_gin(args.gin_file, extra, args.gin_search_path)
        return _mixture_show(args)
    if args.command == "report":
        return _report(args)
    if args.command == "export":
        return _export(args)
    if args.command == "cache":
        return _cache(args, passthrough)
    if args.command == "tasks" and args.tasks_command == "list":
        return _tasks_list()
    if args.command == "tasks" and args.tasks_command == "show":
        return _tasks_show(args)
    if args.command == "vocab" and args.vocab_command == "train":
        return _vocab_train(args)
    raise AssertionError(f"unhandled command {args}")


def _report(args: argparse.Namespace) -> int:
    from mtplatform import report

    report.build(args.experiment_dir)
    print((Path(args.experiment_dir) / "results.md").read_text())
    return 0


def _export(args: argparse.Namespace) -> int:
    from mtplatform import export

    out = export.export_checkpoint(args.checkpoint, args.output, args.vocab, overwrite=args.overwrite)
    print(f"wrote {out}: T5ForConditionalGeneration.from_pretrained and T5Tokenizer.from_pretrained load it")
    return 0


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else "(no message)"


def _without_gin_context(error: Exception) -> str:
    """The error's own message on one line: gin appends "In call to configurable ..." lines that name no culprit."""
    return " ".join(str(error).split("\n  In call to configurable")[0].split())


def _run(command: str) -> int:
    from mtplatform import evaluate, train

    if command in ("train", "finetune", "distill"):
        config = train.RunConfig(finetune=command == "finetune")
        if command == "distill" and config.distillation is None:
            raise ValueError("mtp distill needs train.distillation = @distill() and a TEACHER: include "
                             "gin/runs/distill.gin")
        result = train.train(config)
        print(f"trained to step {result['step']}" + (f", loss {result['loss']:.4f}" if "loss" in result else "")
              + f"; checkpoints, metrics.jsonl and TensorBoard logs in {result['model_dir']}")
    elif command == "experiment":
        from mtplatform import experiment

        root = experiment.experiment()
        print((root / "results.md").read_text())
        print(f"wrote {root}/results.md, results.json and plots")
    elif command == "eval":
        metrics, path = evaluate.evaluate_checkpoint()
        for task, values in metrics.items():
            print(f"{task}: " + ", ".join(f"{k} {v:.2f}" for k, v in values.items()))
        print(f"wrote {path}")
    else:
        print(f"wrote {evaluate.infer()}")
    return 0


def _gin_macro(name: str, default=None):
    """A macro's value from the parsed gin files (None when unbound or still %gin.REQUIRED)."""
    import gin

    try:
        value = gin.query_parameter(f"%{name}")
    except ValueError:
        return default
    return value if isinstance(value, int | dict) else default


def _mixture_show(args: argparse.Namespace) -> int:
    from mtplatform import mixture_view

    lengths = dict(_gin_macro("TASK_FEATURE_LENGTHS") or {"inputs": 512, "targets": 114})
    lengths["inputs"] = args.inputs_length or lengths["inputs"]
    lengths["targets"] = args.targets_length or lengths["targets"]
    steps, batch = args.steps or _gin_macro("TRAIN_STEPS"), args.batch_size or _gin_macro("BATCH_SIZE")
    resolved, measured = mixture_view.measure(args.name, lengths, args.examples, pack=not args.no_pack,
                                              budget_rows=steps * batch if steps and batch else None)
    print(mixture_view.table(resolved, measured, steps, batch))
    if args.plot:
        print(f"wrote {mixture_view.plot(resolved, measured, args.plot)}")
    return 0


def _mixture_search(name: str) -> int:
    from mtplatform import mixture_search

    root = mixture_search.mixture_search(mixture=name)
    print((root / "results.md").read_text())
    print(f"wrote {root}/proposal.gin, results.md, results.json and plots")
    return 0


def _cache(args: argparse.Namespace, pipeline_options: list[str]) -> int:
    import seqio

    from mtplatform import cache

    written = cache.build(args.mixture_or_task, args.output_cache_dir, overwrite=args.overwrite,
                          min_shards=args.min_shards, pipeline_options=pipeline_options or ["--runner=DirectRunner"],
                          modules=args.module)
    for name, where in written.items():
        stats = {split.name.split(".")[1]: json.loads(split.read_text())["examples"]
                 for split in sorted(where.glob("stats.*.json"))}
        absent = sorted(set(seqio.get_mixture_or_task(name).splits) - set(stats))
        print(f"cached {where}: " + ", ".join(f"{split} {n:,} examples" for split, n in stats.items())
              + (f" ({', '.join(absent)}: no data file, not cached)" if absent else ""))
    if not written:
        print(f"nothing to do: every task is cached, and fresh, in {args.output_cache_dir}")
    print(f"runs read it with --gin.cache.dirs=\"['{args.output_cache_dir}']\" or {cache.CACHE_DIR_ENV}="
          f"{args.output_cache_dir}")
    return 0


def _tasks_list() -> int:
    import seqio

    from mtplatform import catalog

    rows = []
    for name in sorted(seqio.TaskRegistry.names()):
        s = catalog.summarize(seqio.get_mixture_or_task(name))
        splits = ", ".join(_split_size(s, split) for split in s.splits)
        missing = "".join(f"  ({split}: missing file {where})" for split, where in s.missing_files.items())
        rows.append((name, splits, (", ".join(s.metrics) or "-") + missing))
    width = [max(len(r[i]) for r in rows) for i in range(2)]
    print(f"{'task':<{width[0]}}  {'splits (examples)':<{width[1]}}  metrics")
    for name, splits, metrics in rows:
        print(f"{name:<{width[0]}}  {splits:<{width[1]}}  {metrics}")
    mixtures = sorted(seqio.MixtureRegistry.names())
    if mixtures:
        print("\nmixtures: " + ", ".join(mixtures))
    return 0


def _split_size(summary, split: str) -> str:
    """`train 2,490`; `train 2,489 (official 2,490)` where the files hold another count; `train missing`."""
    read, declared = summary.splits[split], summary.declared[split]
    if split in summary.missing_files:
        return f"{split} missing"
    if read is None:
        return f"{split} ?"
    return f"{split} {read:,}" + (f" (official {declared:,})" if declared is not None and declared != read else "")


def _tasks_show(args: argparse.Namespace) -> int:

    lengths = {"inputs": args.inputs_length, "targets": args.targets_length}
    for task, split in _tasks_with_split(args.mixture_or_task, args.split):
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


def _tasks_with_split(mixture_or_task: str, split: str) -> list:
    """[(task, split)] for the tasks of `mixture_or_task` that have `split`; those without it are named on stderr,
    and a split no task has is an error listing the splits there are."""
    from mtplatform import catalog

    tasks = catalog.tasks_of(mixture_or_task)
    having = [(task, split) for task in tasks if split in task.splits]
    if not having:
        splits = sorted({s for task in tasks for s in task.splits})
        raise ValueError(f"--split={split}: no task of {mixture_or_task} has it; its splits are {', '.join(splits)}")
    for task in tasks:
        if split not in task.splits:
            print(f"mtp: {task.name} has no {split} split ({', '.join(task.splits)}); skipped", file=sys.stderr)
    return having


def _vocab_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mtplatform import catalog
    from mtplatform.vocab import train_vocabulary

    def texts():
        for task, split in _tasks_with_split(args.mixture_or_task, args.split):
            yield from tqdm(catalog.raw_texts(task, split, args.max_examples_per_task),
                            desc=f"reading {task.name}/{split}", unit=" texts", mininterval=2, file=sys.stderr)

    out = train_vocabulary(texts(), vocab_size=args.vocab_size, output=args.output)
    print(f"wrote vocabulary ({args.vocab_size} ids, 100 sentinels) to {Path(out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
