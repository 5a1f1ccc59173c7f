"""Is training healthy? Non-finite losses, gradients and weights, and loss spikes.

A non-finite loss or gradient norm is caught before the optimizer applies the update (`check_step`); weights are
checked again before a checkpoint is written (`check_finite_state`), so no checkpoint ever holds NaN or inf. A loss
far above its recent average is reported (`SpikeDetector`) and marks the checkpoints written during it unhealthy,
which pruning never prefers to a healthy one.
"""

from __future__ import annotations

import math
import statistics
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch


class Diverged(ArithmeticError):
    """Training produced a non-finite value; the message names the step and the newest good checkpoint."""


def check_step(step: int, loss: float, grad_norm: float, skipped: int, max_skips: int,
               newest_checkpoint: Callable[[], Path | None]) -> bool:
    """True when the step's update may be applied; False when it is to be skipped (a non-finite loss or gradient
    norm, with fewer than `max_skips` consecutive skips so far); raises Diverged, naming the newest checkpoint,
    otherwise."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return True
    what = f"loss {loss}, gradient norm {grad_norm}"
    if skipped < max_skips:
        print(f"mtp: step {step}: {what}; update skipped ({skipped + 1} of train.max_nonfinite_skips="
              f"{max_skips} in a row)", file=sys.stderr)
        return False
    good = newest_checkpoint()
    newest = f"the newest good checkpoint is {good} (rerunning resumes from it)" if good else \
        "no checkpoint was written yet"
    limit = (f"after {max_skips} skipped updates in a row" if max_skips
             else "(train.max_nonfinite_skips=N skips such steps instead)")
    raise Diverged(f"training diverged at step {step} ({what}); stopped before the update {limit}; {newest}; "
                   "try a lower learning rate")


def check_finite_state(step: int, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Raise Diverged naming the first of `tensors` that holds a NaN or inf (checked before a checkpoint is written)."""
    for name, tensor in tensors.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise Diverged(f"{what} {name} holds non-finite values at step {step}; no checkpoint was written")


def optimizer_tensors(state: dict) -> dict[str, torch.Tensor]:
    """The tensors of an optimizer state dict, by a readable name."""
    return {f"{pid}/{key}": value for pid, slots in state.get("state", {}).items()
            for key, value in slots.items()}


class SpikeDetector:
    """Reports a step loss above `factor` times the mean of the last `window` steps (after `window // 2` steps)."""

    def __init__(self, factor: float, window: int = 50, history: list[float] | None = None):
        self.factor = factor
        self.recent: deque[float] = deque(history or [], maxlen=window)

    def observe(self, step: int, loss: float) -> bool:
        """True (and a line on stderr) when `loss` is a spike; the loss joins the history either way."""
        spike = bool(self.factor) and len(self.recent) >= self.recent.maxlen // 2 and \
            loss > self.factor * statistics.fmean(self.recent)
        if spike:
            print(f"mtp: loss spike at step {step}: {loss:.4f}, {loss / statistics.fmean(self.recent):.1f}x the mean "
                  f"of the last {len(self.recent)} steps", file=sys.stderr)
        self.recent.append(loss)
        return spike
