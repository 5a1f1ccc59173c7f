"""seqio's cache on Apache Beam (`mtp cache`): what runs read from it, and the caches they refuse."""

from __future__ import annotations

import shutil

import gin
import numpy as np
import pytest
import seqio
from conftest import mtp
from test_train import _losses  # the metrics reader of the training tests

import tasks  # noqa: F401
from mtplatform import cache

TASK = "glue_wnli"  # the smallest GLUE task: Beam's DirectRunner spends about 20 s on it


def _examples(task: seqio.Task, split: str, use_cached: bool) -> list[tuple]:
    """Every example of `split`, as sorted tuples (the cache is shuffled by Beam, so the order is not compared)."""
    ds = task.get_dataset(None, split=split, shuffle=False, use_cached=use_cached)
    rows = [tuple((k, np.asarray(v).tolist()) for k, v in sorted(ex.items())) for ex in ds.as_numpy_iterator()]
    return sorted(rows, key=repr)


@pytest.fixture(scope="module")
def wnli_cache(tmp_path_factory, data_dir, vocab_file):
    """WNLI cached with the DirectRunner from a copy of its files (the stale test edits one): (data dir, cache)."""
    root = tmp_path_factory.mktemp("cached")
    data = root / "data"
    shutil.copytree(data_dir / "glue" / "WNLI", data / "glue" / "WNLI")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MTP_DATA_DIR", str(data))
        written = cache.build([TASK], root / "cache", min_shards=4)
    assert written == {TASK: root / "cache" / TASK}
    return data, root / "cache"


@pytest.fixture
def reading(wnli_cache, monkeypatch):
    """Runs configured to read the cache, and seqio's memo of where each task is cached cleared around the test."""
    data, cache_dir = wnli_cache
    monkeypatch.setenv("MTP_DATA_DIR", str(data))
    gin.bind_parameter("cache.dirs", [str(cache_dir)])
    seqio.get_mixture_or_task(TASK)._cache_dir = None
    yield data, cache_dir
    gin.clear_config()
    seqio.get_mixture_or_task(TASK)._cache_dir = None
    seqio.set_global_cache_dirs([])


def test_cached_examples_equal_uncached(reading):
    data, cache_dir = reading
    task = seqio.get_mixture_or_task(TASK)
    assert cache.where_cached(task) == cache_dir / TASK
    files = sorted(p.name for p in (cache_dir / TASK).iterdir())
    assert "COMPLETED" in files and "stats.train.json" in files and "train.tfrecord-00000-of-00004" in files
    for split, count in (("train", 635), ("validation", 71)):
        cached = _examples(task, split, use_cached=True)
        assert len(cached) == count
        assert cached == _examples(task, split, use_cached=False)
    # The run's lengths and EOS come after the cache point: the cached tokens are the text's, without EOS.
    (ex,) = task.get_dataset({"inputs": 32, "targets": 4}, split="validation", shuffle=False,
                             use_cached=True).take(1).as_numpy_iterator()
    assert len(ex["inputs"]) <= 32 and ex["inputs"][-1] == 1 and ex["targets"][-1] == 1
    # Nothing to do a second time: the cache there is fresh.
    assert cache.build([TASK], cache_dir, min_shards=4) == {}


def test_stale_cache_is_an_error_naming_the_task(reading):
    data, cache_dir = reading
    task = seqio.get_mixture_or_task(TASK)
    train = data / "glue" / "WNLI" / "train.tsv"
    original = train.read_bytes()
    try:
        train.write_bytes(original.rsplit(b"\n", 2)[0] + b"\n")  # the last example removed
        with pytest.raises(cache.CacheError, match=rf"task {TASK}: the cache at .* is stale \(its source files "
                                                   r"changed since it was written\); rerun `mtp cache "
                                                   rf"--mixture_or_task={TASK} --output_cache_dir=.* --overwrite`"):
            cache.where_cached(task)
        with pytest.raises(cache.CacheError, match="is stale"):  # `mtp cache` too, without --overwrite
            cache.build([TASK], cache_dir)
        gin.bind_parameter("cache.use_cached", False)  # the way out without rebuilding: preprocess inline
        assert not cache.use_cached(task)
    finally:
        train.write_bytes(original)
    gin.bind_parameter("cache.use_cached", True)
    assert cache.use_cached(task)


def test_incomplete_cache_is_an_error_naming_the_task(reading, tmp_path):
    data, cache_dir = reading
    task = seqio.get_mixture_or_task(TASK)
    partial = tmp_path / "partial"
    shutil.copytree(cache_dir / TASK, partial / TASK)
    (partial / TASK / "COMPLETED").unlink()  # as a job killed before its last step leaves it
    gin.bind_parameter("cache.dirs", [str(partial), str(cache_dir)])
    with pytest.raises(cache.CacheError, match=rf"task {TASK}: the cache at {partial / TASK} is incomplete"):
        cache.where_cached(task)
    gin.bind_parameter("cache.dirs", [str(tmp_path / "empty"), str(cache_dir)])  # no cache there: the next dir
    assert cache.where_cached(task) == cache_dir / TASK


def test_tasks_cache_their_deterministic_steps_only():
    """Each task's cache point follows tokenization and precedes anything that needs the run's lengths or draws
    random numbers: an objective's noise is drawn afresh by every run that reads a cached corpus."""
    for name in ("glue_rte", "squad_v1_devsplit", "conll2003_ner", "span_corruption", "bert_mlm", "nsp"):
        task = seqio.get_mixture_or_task(name)
        assert task.supports_caching, name
        names = [getattr(p, "__name__", type(p).__name__) for p in task.preprocessors]
        cut = names.index("CacheDatasetPlaceholder")
        assert "append_eos_after_trim" in names[cut:], name
        assert name not in ("span_corruption", "bert_mlm") or names[cut - 1] == "tokenize", names
    # Splits without data files (CoNLL's testb is not in the shared data) are left out of a cache, not an error.
    assert cache.cacheable_splits(seqio.get_mixture_or_task("conll2003_ner")) == ["train", "validation"]


# --- the command on the whole corpus, training on the cache, exact resume: CI's slow step -------------------------


@pytest.mark.slow
def test_mtp_cache_span_corruption_then_train_reads_it(tmp_path, vocab_file):
    """The issue's check: `mtp cache` over the whole shipped corpus and WNLI (Beam options passed through), documents
    equal to the uncached pipeline's, and training on both cached tasks that resumes exactly."""
    out_dir = tmp_path / "cache"
    out = mtp("cache", "--mixture_or_task=span_corruption", f"--mixture_or_task={TASK}",
              f"--output_cache_dir={out_dir}", "--",
              "--runner=DirectRunner", "--direct_num_workers=2", "--direct_running_mode=multi_processing")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"cached {out_dir / 'span_corruption'}: train 27,525 examples, validation 289 examples" in out.stdout
    assert f"cached {out_dir / TASK}: test 146 examples, train 635 examples, validation 71 examples" in out.stdout
    assert not out.stderr.strip(), out.stderr[-3000:]  # Beam's and TensorFlow's logs stay hidden without --verbose

    task = seqio.get_mixture_or_task("span_corruption")
    gin.bind_parameter("cache.dirs", [str(out_dir)])
    try:
        assert cache.where_cached(task) == out_dir / "span_corruption"
        cached = task._get_cached_source("validation").get_dataset("validation", shuffle=False)
        inline = task.preprocess_precache(task.source.get_dataset("validation", shuffle=False))
        tokens = [sorted(tuple(ex["targets"].tolist()) for ex in ds.as_numpy_iterator()) for ds in (cached, inline)]
        assert len(tokens[0]) == 289 and tokens[0] == tokens[1]
    finally:
        gin.clear_config()
        task._cache_dir = None
        seqio.set_global_cache_dirs([])

    (tmp_path / "cached_mixture.py").write_text(
        f"import seqio\nseqio.MixtureRegistry.add('cached_mix', [('{TASK}', 1.0), ('span_corruption', 1.0)])\n")
    common = ["--module=cached_mixture", "--gin_file=gin/models/tiny.gin", "--gin_file=gin/runs/pretrain.gin",
              "--gin.MIXTURE_OR_TASK_NAME='cached_mix'", "--gin.BATCH_SIZE=8", "--gin.train.log_every=2",
              "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}", "--gin.train.checkpoint_every=4",
              "--gin.train.precision='fp32'", f"--gin.cache.dirs=['{out_dir}']"]
    env = {"PYTHONPATH": str(tmp_path)}
    for steps in (4, 8):  # stopped at 4, resumed to 8, against 8 at once
        out = mtp("train", *common, f"--gin.TRAIN_STEPS={steps}", f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
                  env_extra=env)
        assert out.returncode == 0, out.stderr[-3000:]
        for name in (TASK, "span_corruption"):
            assert f"{name}: reading seqio's cache in {out_dir / name}" in out.stderr
    out = mtp("train", *common, "--gin.TRAIN_STEPS=8", f"--gin.MODEL_DIR='{tmp_path / 'once'}'", env_extra=env)
    assert out.returncode == 0, out.stderr[-3000:]
    resumed, once = (_losses(tmp_path / d) for d in ("run", "once"))
    assert sorted(once) == [2, 4, 6, 8] and once == {step: resumed[step] for step in once}  # bit for bit, fp32

