"""Shared fixtures: the real data in ../shared/data and one small vocabulary trained on it for the session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("MTP_DATA_DIR", REPO.parent / "shared" / "data")).resolve()
os.environ["MTP_DATA_DIR"] = str(DATA_DIR)

from mtplatform.tf_setup import configure_tensorflow  # noqa: E402

configure_tensorflow()


def mtp(*args: str, cwd: Path | str = REPO, env_extra: dict[str, str] | None = None,
        timeout: float = 900) -> subprocess.CompletedProcess:
    """`python -m mtplatform.cli ARGS` in a new process, as a user runs it: output captured, environment extended."""
    return subprocess.run([sys.executable, "-m", "mtplatform.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env_extra or {})}, timeout=timeout)


def mtp_here(*args: str) -> int:
    """`mtp ARGS` through the command's own `cli.main` in this process, from the repository root, gin's
    configuration cleared before and after: the exit code (argparse's included). What it prints is read with
    pytest's capsys or capfd, its environment set with monkeypatch. For commands whose test is their output and
    exit code, not a process of their own: each `mtp` process pays some 15 s of TensorFlow and seqio start-up on a
    slow CPU."""
    import gin

    from mtplatform import cli

    cwd = os.getcwd()
    os.chdir(REPO)
    gin.clear_config()
    try:
        return cli.main(list(args))
    except SystemExit as e:  # argparse's own errors: usage, then one line naming the flag
        return e.code
    finally:
        gin.clear_config()
        os.chdir(cwd)


def train_tiny(model_dir: Path, steps: int, mixture: str, lengths: dict[str, int], bindings: tuple[str, ...] = (),
               dropout: float = 0.1, /, **overrides) -> dict:
    """`train.train` of gin/models/tiny.gin for `steps` steps (batch 4, a checkpoint every 4, a log row every 3,
    Adafactor, 10 warm-up steps, `bindings` after), in fp32: exactness is checked in fp32 on every machine. gin's
    configuration is cleared before and after; `overrides` replace any `train` field."""
    import gin

    from mtplatform import train as train_lib

    gin.clear_config()
    gin.parse_config_files_and_bindings(
        [str(REPO / "gin/models/tiny.gin")],
        [f"T5Config.dropout_rate = {dropout}", "make_optimizer.name = 'adafactor'", "learning_rate.warmup_steps = 10",
         *bindings])
    try:
        kwargs = dict(model_dir=str(model_dir), mixture_or_task_name=mixture,
                      task_feature_lengths=lengths, train_steps=steps, batch_size=4, checkpoint_every=4, log_every=3,
                      progress=False, precision="fp32")
        return train_lib.train(**{**kwargs, **overrides})
    finally:
        gin.clear_config()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "glue").is_dir():
        pytest.fail(f"the real data is not at {DATA_DIR}: set MTP_DATA_DIR to the shared data directory")
    return DATA_DIR


@pytest.fixture(scope="session")
def vocab_file(tmp_path_factory, data_dir) -> Path:
    """A 4,000-id vocabulary trained on a sample of every kind of task text, used by the tasks through MTP_VOCAB."""
    import tasks  # noqa: F401
    from mtplatform import catalog
    from mtplatform.vocab import train_vocabulary

    def texts():
        for name in ("glue_sst2", "glue_rte", "conll2003_ner", "squad_v1_devsplit", "span_corruption"):
            (task,) = catalog.tasks_of(name)
            yield from catalog.raw_texts(task, "train", max_examples=1500)

    path = train_vocabulary(texts(), vocab_size=4000, output=tmp_path_factory.mktemp("vocab") / "test.model")
    os.environ["MTP_VOCAB"] = str(path)
    return path
