"""seqio's offline cache: `mtp cache` builds it on Apache Beam, and runs read it where a fresh one exists.

A task's preprocessors up to its `seqio.CacheDatasetPlaceholder` (reading, text formatting, tokenization: see
`tasks.common`) run once in a Beam pipeline that writes TFRecord shards, seqio's info and stats files, and a
COMPLETED file last. Training and evaluation then start from those records and apply only the steps after the
placeholder (a run's lengths, an objective's noise).

The pipeline is seqio's own (`seqio.beam_utils`: PreprocessTask, the global shuffle, the TFRecord, info and stats
writers), assembled here rather than through `seqio.scripts.cache_tasks_main.run_pipeline`, which reads absl flags
and takes no per-task completion contents. Our COMPLETED file holds the task's fingerprint (its pre-cache
preprocessors and their code, its vocabulary, its source files): a run refuses, naming the task, a cache whose
fingerprint no longer matches (stale) or that has no COMPLETED file (incomplete), instead of training on it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import gin
import seqio

from mtplatform import settings, tf_setup

CACHE_DIR_ENV = "MTP_CACHE_DIR"
COMPLETED = "COMPLETED"
LOG = "mtp_cache.log"  # Beam's own log, under the output directory
EDGE_BYTES = 1 << 20  # a source file is fingerprinted by its size and the hash of its first and last MiB


class CacheError(ValueError):
    """A task's cache cannot be used as it is; the message names the task, the directory and the fix."""


@gin.configurable("cache")
def cache_settings(dirs: Sequence[str] | None = None, use_cached: bool = True) -> tuple[list[Path], bool]:
    """(cache directories, whether to read them). Directories: gin `cache.dirs`, else `$MTP_CACHE_DIR`
    (os.pathsep-separated), else none. With `cache.use_cached = False` every task is preprocessed inline."""
    if dirs is None:
        dirs = [d for d in os.environ.get(CACHE_DIR_ENV, "").split(os.pathsep) if d]
    return [Path(d).expanduser() for d in dirs], use_cached


def task_dir(cache_dir: str | os.PathLike, task: seqio.Task) -> Path:
    """Where seqio keeps `task`'s cache under `cache_dir`."""
    return Path(cache_dir) / seqio.get_task_dir_from_name(task.name)


# --- fingerprints -----------------------------------------------------------------------------------------------


def fingerprint(task: seqio.Task) -> dict:
    """What the cached records of `task` were computed from: any change to it makes the cache stale."""
    pre_cache = task.preprocessors[: task._cache_step_idx]  # seqio keeps the placeholder's index private
    return {
        "task": task.name,
        "splits": cacheable_splits(task),
        "preprocessors": [_function_id(p) for p in pre_cache],
        "vocabularies": {name: _vocabulary_id(f.vocabulary) for name, f in sorted(task.output_features.items())},
        "sources": {split: _source_files(task, split) for split in cacheable_splits(task)},
        "seqio": seqio.__version__,
    }


def cacheable_splits(task: seqio.Task) -> list[str]:
    """The splits whose files are all there (CoNLL's testb, say, is not in the shared data): the ones cached."""
    missing = getattr(task.source, "missing", lambda split: None)
    return sorted(split for split in task.splits if not missing(split))


def _function_id(fn) -> str:
    """A preprocessor's name, bound arguments and a hash of its code (editing the function invalidates caches)."""
    args = ""
    while isinstance(fn, functools.partial):
        args += repr(sorted(fn.keywords.items())) + repr(fn.args)
        fn = fn.func
    try:
        code = hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:16]
    except (OSError, TypeError):
        code = "?"
    args = re.sub(r" at 0x[0-9a-f]+", "", args)  # a bound function's repr holds its address, new in every process
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}{args} {code}"


def _vocabulary_id(vocabulary: seqio.Vocabulary) -> str:
    model = getattr(vocabulary, "sentencepiece_model_file", None)
    if model and Path(model).is_file():
        digest = hashlib.sha256(Path(model).read_bytes()).hexdigest()[:16]
        return f"sentencepiece {digest} extra_ids={vocabulary.extra_ids}"
    return repr(vocabulary)


def _source_files(task: seqio.Task, split: str) -> list[str] | str:
    """Each source file relative to the data directory, with its size and edge hash; other sources by repr."""
    files = getattr(task.source, "files", None)
    if files is None:
        return repr(task.source)
    root = settings.data_dir()
    return [f"{_relative(path, root)} {path.stat().st_size} {_edge_hash(path)}" for path in files(split)]


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _edge_hash(path: Path) -> str:
    """The hash of a file's first and last MiB: cheap on a corpus of any size, and it changes with any append,
    truncation or edit near either end (a same-size edit in the middle of a large file goes unnoticed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(EDGE_BYTES))
        if path.stat().st_size > 2 * EDGE_BYTES:
            f.seek(-EDGE_BYTES, os.SEEK_END)
        digest.update(f.read(EDGE_BYTES))
    return digest.hexdigest()[:16]


def _difference(recorded: dict, current: dict) -> str:
    for key in current:
        if recorded.get(key) != current[key]:
            return {"splits": "its splits", "preprocessors": "its preprocessing before the cache point",
                    "vocabularies": "its vocabulary", "sources": "its source files",
                    "seqio": "the seqio version"}.get(key, key)
    return ""


# --- reading ----------------------------------------------------------------------------------------------------


def use_cached(task: seqio.Task) -> bool:
    """Whether a run reads `task` from a cache (see `where_cached`)."""
    return where_cached(task) is not None


def where_cached(task: seqio.Task) -> Path | None:
    """The cache a run reads `task` from: the first configured cache directory holding a fresh, complete cache of
    it (seqio is then pointed at the directories); None where none holds one, or caching is off. A stale or
    incomplete cache is an error that names the task and how to rebuild it."""
    dirs, enabled = cache_settings()
    if not enabled or not task.supports_caching:
        return None
    for cache_dir in dirs:
        if is_cached(task, cache_dir):
            seqio.set_global_cache_dirs([str(d) for d in dirs])  # seqio takes the first with COMPLETED, as here
            return task_dir(cache_dir, task)
    return None


def is_cached(task: seqio.Task, cache_dir: str | os.PathLike) -> bool:
    """True where `cache_dir` holds a fresh, complete cache of `task`, False where it holds none; a stale or
    incomplete one is a `CacheError`."""
    where = task_dir(cache_dir, task)
    if not where.exists():
        return False
    rebuild = f"rerun `mtp cache --mixture_or_task={task.name} --output_cache_dir={cache_dir} --overwrite`"
    completed = where / COMPLETED
    if not completed.is_file():
        raise CacheError(f"task {task.name}: the cache at {where} is incomplete (no {COMPLETED} file: the job "
                         f"that wrote it did not finish); {rebuild}, or remove the directory")
    try:
        recorded = json.loads(completed.read_text() or "{}")
    except json.JSONDecodeError:
        recorded = {}
    changed = _difference(recorded, fingerprint(task))
    if changed:
        raise CacheError(f"task {task.name}: the cache at {where} is stale ({changed} changed since it was "
                         f"written); {rebuild}, or set cache.use_cached = False")
    return True


# --- building ---------------------------------------------------------------------------------------------------


def build(names: Sequence[str], output_dir: str | os.PathLike, *, overwrite: bool = False, min_shards: int = 64,
          pipeline_options: Sequence[str] = ("--runner=DirectRunner",), modules: Sequence[str] = ()) -> dict[str, Path]:
    """Cache every task of the tasks or mixtures `names` under `output_dir` with one Beam pipeline; return the
    directory written for each task built, by task name (seqio's directory names are not task names).
    `pipeline_options` go to Beam unchanged (any runner: Dataflow, Flink, Spark).

    A task already cached there and fresh is skipped; a stale or incomplete one is an error unless `overwrite`.
    Workers import `tasks` and `modules` and get this process's data directory and vocabulary.
    """
    import apache_beam as beam  # imported here: a second or two, and only this command needs it

    todo = [task for task in _tasks_of(names) if _needs_building(task, output_dir, overwrite)]
    setup = functools.partial(_worker_setup, str(settings.data_dir()), str(settings.vocab_path()))
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    if todo:  # the pipeline itself shows no progress: say what it is doing, and where its log is
        print(f"mtp cache: preprocessing {', '.join(t.name for t in todo)} with Apache Beam "
              f"({' '.join(pipeline_options)}); Beam's log: {Path(output_dir) / LOG}", flush=True)
    with _logs_to(Path(output_dir) / LOG):
        with beam.Pipeline(options=beam.options.pipeline_options.PipelineOptions(list(pipeline_options))) as pipe:
            for task in todo:
                _add_task(pipe, task, Path(output_dir), setup, ["tasks", *modules], min_shards)
    return {task.name: task_dir(output_dir, task) for task in todo}


@contextlib.contextmanager
def _logs_to(log: Path) -> Iterator[None]:
    """Beam's worker processes inherit stderr and log at INFO: unless `mtp --verbose`, this process's stderr (and so
    theirs) goes to `log` while the pipeline runs."""
    if tf_setup.verbose_logs:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(log, "ab") as f:
            os.dup2(f.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _tasks_of(names: Sequence[str]) -> list[seqio.Task]:
    tasks: dict[str, seqio.Task] = {}
    for name in names:
        for task in seqio.get_subtasks(seqio.get_mixture_or_task(name)):
            if not task.supports_caching:
                raise CacheError(f"task {task.name} has no seqio.CacheDatasetPlaceholder among its preprocessors: "
                                 "nothing to cache (add one after its deterministic steps, as tasks.common does)")
            tasks[task.name] = task
    return list(tasks.values())


def _needs_building(task: seqio.Task, output_dir: str | os.PathLike, overwrite: bool) -> bool:
    """False where `output_dir` already holds a fresh cache of `task`; an old one is removed where `overwrite`."""
    where = task_dir(output_dir, task)
    if overwrite and where.exists():
        shutil.rmtree(where)
    return not is_cached(task, output_dir)


def _worker_setup(data_dir: str, vocab_path: str) -> None:
    """Run by Beam before a worker reads a task: the data and vocabulary of the process that built the pipeline."""
    os.environ[settings.DATA_DIR_ENV] = data_dir
    os.environ[settings.VOCAB_ENV] = vocab_path


def _add_task(pipeline, task: seqio.Task, output_dir: Path, setup, modules: list[str], min_shards: int) -> None:
    """seqio's caching steps for every split of `task`, then COMPLETED holding its fingerprint once all are done."""
    import apache_beam as beam
    from seqio import beam_utils

    out = str(task_dir(output_dir, task))
    done = []
    for split in cacheable_splits(task):
        label = f"{task.name}_{split}"
        read = beam_utils.PreprocessTask(task, split, setup_fn=setup, modules_to_import=modules)
        num_shards = max(len(read.shards), min_shards)
        examples = (pipeline | f"{label}_read" >> read
                    | f"{label}_global_shuffle" >> beam.Reshuffle())  # seqio's: shuffles the examples across shards
        done.append(examples | f"{label}_write" >> beam_utils.WriteExampleTfRecord(
            seqio.get_cached_tfrecord_prefix(out, split), num_shards=num_shards))
        done.append(examples | f"{label}_info" >> beam_utils.GetInfo(num_shards)
                    | f"{label}_write_info" >> beam_utils.WriteJson(seqio.get_cached_info_path(out, split)))
        done.append(examples | f"{label}_stats" >> beam_utils.GetStats(task.output_features)
                    | f"{label}_write_stats" >> beam_utils.WriteJson(seqio.get_cached_stats_path(out, split)))
    _ = (done
         | f"{task.name}_all_written" >> beam.Flatten()
         | f"{task.name}_nothing" >> beam.Filter(lambda _: False)
         | f"{task.name}_completed" >> beam.io.textio.WriteToText(
             os.path.join(out, COMPLETED), append_trailing_newlines=False, num_shards=1, shard_name_template="",
             header=json.dumps(fingerprint(task), indent=1)))
