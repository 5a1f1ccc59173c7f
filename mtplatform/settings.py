"""Where the platform finds its data and vocabulary: environment variables, overridable by gin.

Resolved when a dataset or vocabulary is first used, not when tasks are registered, so that a gin file or a
`--gin.DATA_DIR=...` override parsed after `import tasks` still takes effect.
"""

from __future__ import annotations

import os
from pathlib import Path

import gin

DATA_DIR_ENV = "MTP_DATA_DIR"
VOCAB_ENV = "MTP_VOCAB"
DEFAULT_VOCAB = Path("~/.cache/mtplatform/vocab/mtp.model")
EXTRA_IDS = 100  # T5's sentinel ids, appended to the SentencePiece pieces (here, not in `vocab`: no seqio to import)


class SettingError(ValueError):
    """A setting is missing or points at nothing."""


@gin.configurable("data_dir")
def data_dir(path: str | None = None) -> Path:
    """The data directory, laid out like the official releases (`glue/<TASK>/*.tsv`, `squad/`, `conll2003/`, `text/`).

    From the gin binding `data_dir.path` (the run gin files bind it to `%DATA_DIR`), else `$MTP_DATA_DIR`.
    """
    value = path or os.environ.get(DATA_DIR_ENV)
    if not value:
        raise SettingError(
            f"no data directory: set the environment variable {DATA_DIR_ENV} (for example to ../shared/data) "
            "or, in commands that take gin settings, bind data_dir.path (the DATA_DIR macro of the run gin files)"
        )
    resolved = Path(value).expanduser()
    if not resolved.is_dir():
        raise SettingError(f"data directory {resolved} (from {DATA_DIR_ENV} or gin data_dir.path) does not exist")
    return resolved


@gin.configurable("vocab_path")
def vocab_path(path: str | None = None) -> Path:
    """The SentencePiece model the tasks tokenize with: gin `vocab_path.path`, else `$MTP_VOCAB`, else the default
    output of `mtp vocab train`."""
    return Path(path or os.environ.get(VOCAB_ENV) or DEFAULT_VOCAB).expanduser()
