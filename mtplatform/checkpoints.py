"""Checkpoint directories: written atomically, found by step, pruned to the last N.

`MODEL_DIR/checkpoint_<step>/` holds everything needed to continue: `model.safetensors`, `train_state.pt`
(optimizer, step, RNG states), `data_rank<r>/` (each process's data iterator) and `config.gin`. It is assembled
under a temporary name and renamed when complete, so a crash never leaves a `checkpoint_<step>` that is partial;
leftover temporary directories are ignored and removed by the next save.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

_NAME = re.compile(r"checkpoint_(\d+)")
TMP_PREFIX = ".tmp-checkpoint_"


def checkpoint_dir(model_dir: Path, step: int) -> Path:
    return Path(model_dir) / f"checkpoint_{step}"


def temporary_dir(model_dir: Path, step: int) -> Path:
    return Path(model_dir) / f"{TMP_PREFIX}{step}"


def all_steps(model_dir: Path) -> list[int]:
    """Steps of the complete checkpoints in `model_dir`, ascending."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in model_dir.iterdir() if (m := _NAME.fullmatch(p.name)) and p.is_dir())


def latest(model_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    steps = all_steps(model_dir)
    return checkpoint_dir(model_dir, steps[-1]) if steps else None


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or the latest one inside a model directory; a clear error otherwise."""
    path = Path(path)
    if _NAME.fullmatch(path.name) and (path / "model.safetensors").is_file():
        return path
    found = latest(path)
    if found is None:
        raise FileNotFoundError(f"{path}: neither a checkpoint_<step> directory nor a model directory holding one")
    return found


def commit(model_dir: Path, step: int, keep: int | None) -> Path:
    """Rename the finished temporary directory of `step` into place; delete all but the newest `keep`."""
    final = checkpoint_dir(model_dir, step)
    if final.exists():  # saving the same step again (e.g. at the end of a resumed run that had nothing to do)
        shutil.rmtree(final)
    temporary_dir(model_dir, step).rename(final)
    if keep:
        for old in all_steps(model_dir)[:-keep]:
            shutil.rmtree(checkpoint_dir(model_dir, old), ignore_errors=True)
    for leftover in Path(model_dir).glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return final
