"""The run directory (MODEL_DIR) and its checkpoints; the only module that spells their file names.

`MODEL_DIR` holds `config.gin` (the resolved gin config), `mixture.json` (the rates as resolved when the run began,
and what a resume reads back), `metrics.jsonl` (one row per logged step), `tensorboard/`, and the checkpoints:
checkpoint directories are written atomically with checksums, found by step, verified on restore, pruned
atomically.

`MODEL_DIR/checkpoint_<step>/` holds everything needed to continue: `model.safetensors`, `train_state.pt`
(optimizer, step, RNG states), `data_rank<r>/` (each process's data iterator), `config.gin`, and `meta.json` (the
step, the loss when it was written, whether training was healthy then, and each file's size and SHA-256).

- It is assembled under a temporary name unique to the attempt (`.tmp-checkpoint_<step>-<attempt>`) and renamed
  when complete, so a crash never leaves a partial `checkpoint_<step>`, and two attempts never share a name.
- Pruning renames a checkpoint to `.deleting-checkpoint_<step>` before deleting it, so an interrupted prune leaves
  nothing that looks like a checkpoint; it never removes the newest checkpoint written while training was healthy.
- `latest_readable` checks the newest checkpoint's files against its checksums and falls back to the previous one,
  setting the unreadable one aside (renamed, not deleted: no data is lost).
- A full disk (`no_space_named`) is an error naming the path and the space a checkpoint needs; a failed save
  removes its temporary directory (`discard`), and the run files are replaced atomically, never left cut.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from mtplatform.model import T5
    from mtplatform.model_config import T5Config

_NAME = re.compile(r"checkpoint_(\d+)")
TMP_PREFIX = ".tmp-checkpoint_"
DELETING_PREFIX = ".deleting-checkpoint_"
UNREADABLE_PREFIX = "unreadable-checkpoint_"
META = "meta.json"
MODEL = "model.safetensors"
TRAIN_STATE = "train_state.pt"  # optimizer, step, data and RNG state, per-task counters
CONFIG = "config.gin"
MIXTURE = "mixture.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
EVAL_METRICS = "metrics.json"
REPLICATES = "bootstrap.npz"  # beside metrics.json: each task's metrics on `stats.SAMPLES` resamples of its examples


# --- the run directory's own files ---------------------------------------------------------------------------------


class DiskFull(OSError):
    """No space left where a run writes; the message names the path (and the space needed, where known)."""


@contextmanager
def no_space_named(path: Path, what: str, needed_bytes: int | None = None) -> Iterator[None]:
    """Turn ENOSPC inside the block into `DiskFull` naming `path`, `what` was being written and the space needed."""
    try:
        yield
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        existing = next((p for p in (Path(path), *Path(path).parents) if p.exists()), Path("/"))
        need = f"; it needs about {needed_bytes / 2**20:,.1f} MiB" if needed_bytes else ""
        raise DiskFull(f"no space left on the device of {path} writing {what}{need} "
                       f"({shutil.disk_usage(existing).free / 2**20:,.1f} MiB free); free space there and run the "
                       "same command again") from None


def replace_text(path: Path, text: str) -> None:
    """Write `path` whole or not at all (a temporary file renamed over it): a kill or a full disk never leaves it
    cut, and ENOSPC names the file. Every file of a run or experiment directory is written through it."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with no_space_named(path, path.name):
            tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_run_files(model_dir: Path, config_text: str, mixture: dict) -> None:
    """The run's resolved gin config and its mixture as resolved (`mixture.json`), at the top of MODEL_DIR."""
    replace_text(Path(model_dir) / CONFIG, config_text)
    replace_text(mixture_file(model_dir), json.dumps(mixture, indent=2) + "\n")


def mixture_file(model_dir: Path) -> Path:
    return Path(model_dir) / MIXTURE


def read_mixture(model_dir: Path) -> dict | None:
    """What `write_run_files` recorded of the mixture, or None where the run has not started."""
    path = mixture_file(model_dir)
    return json.loads(path.read_text()) if path.is_file() else None


def metrics_file(model_dir: Path) -> Path:
    return Path(model_dir) / METRICS


def tensorboard_dir(model_dir: Path) -> Path:
    return Path(model_dir) / TENSORBOARD


def read_metrics(model_dir: Path) -> list[dict]:
    """The rows of `metrics.jsonl`; none where there is no such file."""
    path = metrics_file(model_dir)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


# --- checkpoints ---------------------------------------------------------------------------------------------------


def stage_eval_dir(stage_dir: Path, step: int, task: str) -> Path:
    """Where an experiment keeps one task's evaluation of one of a stage's checkpoints."""
    return Path(stage_dir) / "eval" / f"{step}_{task}"


def write_replicates(replicates: dict[str, dict], path: Path) -> None:
    """{task: {metric: bootstrap replicates}} as `<task>/<metric>` arrays (float32: a report needs no more),
    written atomically."""
    import numpy as np

    arrays = {f"{task}/{metric}": np.asarray(values, dtype=np.float32)
              for task, metrics in replicates.items() for metric, values in metrics.items()}
    partial = path.with_suffix(".partial.npz")
    np.savez_compressed(partial, **arrays)
    partial.replace(path)


def read_replicates(path: Path, task: str) -> dict:
    """{metric: replicates (float64)} of `task` from a `write_replicates` file; empty where the file is absent
    (evaluations from before replicates were kept)."""
    import numpy as np

    if not path.is_file():
        return {}
    with np.load(path) as arrays:
        return {key.split("/", 1)[1]: arrays[key].astype(np.float64) for key in arrays.files
                if key.split("/", 1)[0] == task}


def checkpoint_dir(model_dir: Path, step: int) -> Path:
    return Path(model_dir) / f"checkpoint_{step}"


def temporary_dir(model_dir: Path, step: int, attempt: str) -> Path:
    return Path(model_dir) / f"{TMP_PREFIX}{step}-{attempt}"


def data_state_dir(checkpoint: Path, rank: int) -> Path:
    """Where process `rank` saves its data iterator inside a (temporary or complete) checkpoint directory."""
    return Path(checkpoint) / f"data_rank{rank}"


# --- a model's weights file -----------------------------------------------------------------------------------------


def save_model(model: T5, path: str | Path, state_dict: dict | None = None) -> None:
    """A `model.T5`'s weights as safetensors with its config in the metadata (`state_dict`: a gathered one, under
    FSDP): the file every checkpoint holds, and what `mtp export`, `mtp eval` and fine-tuning read."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    state = model.state_dict() if state_dict is None else state_dict
    save_file({k: v.contiguous() for k, v in state.items()}, str(path),
              metadata={"mtplatform_config": json.dumps(asdict(model.cfg))})


def load_model(path: str | Path, map_location: str = "cpu") -> T5:
    """The `model.T5` that `save_model` wrote."""
    from safetensors.torch import load_file

    from mtplatform.model import T5

    model = T5(_model_config(path))
    model.load_state_dict(load_file(str(path), device=map_location))
    return model


def load_arrays(path: str | Path) -> tuple[dict[str, np.ndarray], T5Config]:
    """(weights as numpy arrays by name, `T5Config`) of a file `save_model` wrote, without torch: `mtp export`."""
    from safetensors.numpy import load_file

    return load_file(str(path)), _model_config(path)


def _model_config(path: str | Path) -> T5Config:
    from safetensors import safe_open

    from mtplatform.model_config import T5Config

    with safe_open(str(path), "np") as f:
        meta = f.metadata() or {}
    if "mtplatform_config" not in meta:
        raise ValueError(f"{path}: not an mtplatform model file (no mtplatform_config metadata)")
    return T5Config(**json.loads(meta["mtplatform_config"]))


def write_train_state(directory: Path, model, model_state: dict, train_state: dict, config_text: str) -> None:
    """The weights (`model_state`: a gathered one under FSDP), the rest of the train state (optimizer, step, RNG,
    counters) and the gin config, into a temporary checkpoint directory; `finish` seals it."""
    import torch

    save_model(model, directory / MODEL, model_state)
    torch.save(train_state, directory / TRAIN_STATE)
    (directory / CONFIG).write_text(config_text)


def read_train_state(checkpoint: Path) -> tuple:
    """(model, train state) of a complete checkpoint, as `write_train_state` wrote them."""
    import torch

    return load_model(checkpoint / MODEL), torch.load(checkpoint / TRAIN_STATE, map_location="cpu", weights_only=False)


def read_vocabulary(path: str | Path) -> dict | None:
    """The vocabulary fingerprint saved with a checkpoint (or a model directory's latest); None for a checkpoint
    from before fingerprints, or a directory that is not ours (a Hugging Face one)."""
    import torch

    state_file = resolve(path) / TRAIN_STATE
    if not state_file.is_file():
        return None
    return torch.load(state_file, map_location="cpu", weights_only=False).get("vocabulary")


def discard(directory: Path) -> None:
    """Remove a temporary checkpoint directory that a failed save left (a full disk stays full otherwise)."""
    shutil.rmtree(directory, ignore_errors=True)


def finish(directory: Path, model_dir: Path, step: int, world_size: int, loss: float | None, healthy: bool,
           keep: int | None, attempt: str) -> Path:
    """Checksum the temporary checkpoint `directory` (`write_meta`) and move it into place (`commit`)."""
    write_meta(directory, step, world_size, loss, healthy)
    return commit(model_dir, step, keep, attempt)


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
    if _NAME.fullmatch(path.name) and (path / MODEL).is_file():
        return path
    found = latest(path)
    if found is None:
        raise FileNotFoundError(f"{path}: neither a checkpoint_<step> directory nor a model directory holding one")
    return found


def verified_weights(path: str | Path, setting: str) -> tuple[Path, int]:
    """The model file of a checkpoint (or of a model directory's latest), checked against its checksum, and its
    step: what evaluation, fine-tuning and export read. `setting` names where the path came from in an error."""
    ckpt = resolve(path)
    why = problem(ckpt, only=(MODEL,))
    if why:
        raise ValueError(f"{setting}={path}: {ckpt} cannot be read ({why})")
    return ckpt / MODEL, read_meta(ckpt)["step"]


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_meta(directory: Path, step: int, world_size: int, loss: float | None, healthy: bool) -> None:
    """meta.json, written last: the step, the recent loss, health, and the size and SHA-256 of every other file."""
    files = {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != META}
    meta = {"step": step, "world_size": world_size, "loss": loss, "healthy": healthy, "files": files}
    (directory / META).write_text(json.dumps(meta, indent=1) + "\n")


def read_meta(checkpoint: Path) -> dict:
    """A checkpoint's meta.json; a ValueError where it is not the record `write_meta` writes (a JSON object with a
    whole-number step and, if any, a table of files)."""
    meta = json.loads((Path(checkpoint) / META).read_text())
    if not isinstance(meta, dict) or isinstance(meta.get("step"), bool) or not isinstance(meta.get("step"), int) \
            or not isinstance(meta.get("files", {}), dict):
        raise ValueError(f"{Path(checkpoint) / META} is not a checkpoint record (no whole-number 'step')")
    return meta


def problem(checkpoint: Path, only: tuple[str, ...] | None = None) -> str | None:
    """Why `checkpoint` (or the files of it named in `only`) cannot be restored: a missing, truncated or altered
    file; None when intact. Checkpoints written before checksums were recorded are checked for presence only."""
    checkpoint = Path(checkpoint)
    try:
        meta = read_meta(checkpoint)
    except (OSError, ValueError) as e:
        return f"{META} unreadable ({e.__class__.__name__})"
    expected = meta.get("files") or {name: None for name in (MODEL, TRAIN_STATE)}
    for name, record in expected.items():
        if only is not None and name not in only:
            continue
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if record is None:
            continue
        if path.stat().st_size != record["size"]:
            return f"{name} has {path.stat().st_size} bytes, {record['size']} were written"
        if _sha256(path) != record["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest_readable(model_dir: Path, start_over: bool = False) -> Path | None:
    """The newest checkpoint that passes `problem`; each newer one that does not is reported by name and renamed
    to `unreadable-checkpoint_<step>-<time>` so that it is neither restored nor pruned.

    A run whose checkpoints are all unreadable (or were all set aside before) is an error, not a silent start from
    scratch that would overwrite its metrics: `start_over` (train.start_over_if_unreadable) allows that."""
    bad, good = [], None
    for step in reversed(all_steps(model_dir)):  # newest first, checksumming no further than the first good one
        why = problem(checkpoint_dir(model_dir, step))
        if why is None:
            good = checkpoint_dir(model_dir, step)
            break
        bad.append((step, why))
    set_aside = sorted(p.name for p in Path(model_dir).glob(f"{UNREADABLE_PREFIX}*")) if Path(model_dir).is_dir() \
        else []
    if good is None and (bad or set_aside) and not start_over:
        found = "; ".join(f"{checkpoint_dir(model_dir, step).name}: {why}" for step, why in bad)
        raise ValueError(f"MODEL_DIR {model_dir}: no checkpoint can be restored ({found or 'set aside before: '}"
                         f"{'' if found else ', '.join(set_aside)}); set train.start_over_if_unreadable = True to "
                         "train it again from scratch, or use another MODEL_DIR")
    for step, why in bad:
        checkpoint = checkpoint_dir(model_dir, step)
        aside = Path(model_dir) / f"{UNREADABLE_PREFIX}{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        checkpoint.rename(aside)
        print(f"mtp: {checkpoint} cannot be restored ({why}); moved it to {aside.name} and falling back to the "
              "previous checkpoint", file=sys.stderr)
    return good


def newest_healthy(model_dir: Path) -> int | None:
    """The step of the newest checkpoint written while training was healthy (meta.json says so)."""
    for step in reversed(all_steps(model_dir)):
        try:
            if read_meta(checkpoint_dir(model_dir, step)).get("healthy", True):
                return step
        except (OSError, ValueError):
            continue
    return None


def _delete(model_dir: Path, step: int) -> None:
    """Rename first, then delete: an interrupted deletion leaves `.deleting-...`, never a partial checkpoint."""
    doomed = Path(model_dir) / f"{DELETING_PREFIX}{step}"
    shutil.rmtree(doomed, ignore_errors=True)
    checkpoint_dir(model_dir, step).rename(doomed)
    shutil.rmtree(doomed)


def commit(model_dir: Path, step: int, keep: int | None, attempt: str) -> Path:
    """Rename the attempt's finished temporary directory of `step` into place; delete all but the newest `keep`
    (always keeping the newest healthy one) and whatever earlier attempts or prunes left behind."""
    final = checkpoint_dir(model_dir, step)
    if final.exists():  # saving the same step again (e.g. at the end of a resumed run that had nothing to do)
        _delete(model_dir, step)
    temporary_dir(model_dir, step, attempt).rename(final)
    if keep:
        protected = newest_healthy(model_dir)
        for old in all_steps(model_dir)[:-keep]:
            if old != protected:
                _delete(model_dir, old)
    for leftover in [*Path(model_dir).glob(f"{TMP_PREFIX}*"), *Path(model_dir).glob(f"{DELETING_PREFIX}*")]:
        shutil.rmtree(leftover, ignore_errors=True)  # the run holds MODEL_DIR's lock: no other writer owns these
    return final
