"""Clean stops on SIGTERM (a cluster's preemption notice) and SIGINT (Ctrl-C): finish the step, checkpoint, exit.

The first signal only sets a flag that the training loop reads between steps; the loop then writes a checkpoint and
raises `Stopped`, which `mtp` turns into one line and exit code 128 + the signal's number (143 for SIGTERM, 130 for
SIGINT), distinct from errors (2) and success (0), so a scheduler can tell "preempted, resumable" from "failed".
A second signal exits at once with the same code. Before the loop takes over (`exit_at_once`: start-up, set-up,
between an experiment's stages) a signal exits at once, with one line: nothing written then needs finishing, and
set-up can sit in one long call that a flag would never interrupt.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    """Training stopped on a signal after writing a checkpoint."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequests:
    """Within `with StopRequests() as stops:`, `stops.signum` is the first SIGTERM/SIGINT received, or None."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            os._exit(128 + signum)  # the second signal: the user means now
        self.signum = signum
        print(f"\nmtp: {signal.Signals(signum).name} received: finishing this step and writing a checkpoint "
              "(send it again to exit at once)", file=sys.stderr)

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@contextmanager
def exit_at_once() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT exit the process at once with 128 + the signal's number and one line
    (a `StopRequests` inside takes over while training steps). Only the main thread can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        print(f"\nmtp: {signal.Signals(signum).name} received outside a training step: exiting now (nothing is left "
              "half-written; a training run resumes from its last checkpoint)", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    previous = {sig: signal.signal(sig, handle) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
