"""One writer per MODEL_DIR: an advisory lock (`MODEL_DIR/.lock`) that names its holder.

The lock is `flock` on the file, which the kernel releases when the holding process dies however it dies, so a lock
left by a killed run never blocks the next one; the file's content (pid, host, start time) names the holder for the
error a second writer gets, and tells the next holder that it takes over from a run that did not stop cleanly.
flock is per host: on a network file system shared by several hosts it may not exclude a writer on another host.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".lock"


class ModelDirInUse(ValueError):
    """Another process holds MODEL_DIR's lock; the message names it."""


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started "
            f"{holder.get('started', '?')}")


@contextmanager
def hold(model_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Hold MODEL_DIR's lock for the duration (a no-op when not `enabled`, on all but the main process)."""
    if not enabled:
        yield
        return
    path = Path(model_dir) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ModelDirInUse(f"{model_dir} is being written by another run ({_describe(_read(path))}; lock "
                                f"{path}); wait for it to finish or stop it, or use another MODEL_DIR") from None
        left = _read(path)
        if left:
            print(f"mtp: taking over {path} from a run that did not release it ({_describe(left)}; no longer "
                  "running)", file=sys.stderr)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # released cleanly: the next holder has nothing to take over
    finally:
        os.close(fd)  # closing releases the flock


def _read(path: Path) -> dict:
    try:
        text = path.read_text()
        return json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {"pid": "?", "host": "?", "started": "? (unreadable lock file)"}
