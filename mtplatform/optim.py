"""Optimizers and learning-rate schedules, gin-selectable.

- `adafactor`: T5's default, Hugging Face's implementation (factored second moments, update clipping at 1.0,
  learning rate relative to the parameter's RMS), driven by our schedule rather than its internal one.
- `adamw`: torch's AdamW, its fused kernel (one pass over each parameter: on 2 CPU cores a T5-small step of it
  takes a third of the foreach version's time, which loops over per-tensor operations there).
- `adamw_scale`: nanoT5's AdamW variant whose step is scaled by the parameter's RMS (as Adafactor's is), which lets
  AdamW use Adafactor-like learning rates for T5.

Schedules return the absolute learning rate at a step: `rsqrt` (T5: base / sqrt(max(step, warmup))), `constant`,
`linear` and `cosine` (both decay to 0 at `total_steps`, after a linear warm-up).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import gin
import torch

from mtplatform import validation


class AdamWScale(torch.optim.AdamW):
    """AdamW whose update is multiplied by max(1e-3, RMS(parameter)) (nanoT5's `AdamWScale`)."""

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        before = [[p.detach().clone() for p in g["params"]] for g in self.param_groups]
        loss = super().step(closure)
        for group, olds in zip(self.param_groups, before, strict=True):
            for p, old in zip(group["params"], olds, strict=True):
                if p.grad is None:
                    continue
                scale = old.float().pow(2).mean().sqrt().clamp(min=1e-3)
                p.copy_(old + (p - old) * scale)
        return loss


@gin.configurable
def make_optimizer(params: Iterable[torch.nn.Parameter], name: str = "adafactor", weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """The optimizer named `name`; its learning rate is set every step by the schedule."""
    _check_optimizer(name, weight_decay, betas)
    params = list(params)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=1e-3, scale_parameter=True, relative_step=False, warmup_init=False,
                         clip_threshold=1.0, decay_rate=-0.8, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, betas=betas, weight_decay=weight_decay, fused=True)
    if name == "adamw_scale":
        return AdamWScale(params, lr=1e-3, betas=betas, weight_decay=weight_decay, fused=True)
    raise ValueError(f"make_optimizer.name={name!r}: use 'adafactor', 'adamw' or 'adamw_scale'")


def _check_optimizer(name: str, weight_decay: object, betas: object) -> None:
    validation.number_in("make_optimizer.weight_decay", weight_decay, 0.0)
    if name in ("adamw", "adamw_scale"):
        if not isinstance(betas, tuple | list) or len(betas) != 2:
            raise ValueError(f"make_optimizer.betas = {betas!r}: must be two numbers (beta1, beta2), as (0.9, 0.999)")
        for i, beta in enumerate(betas):
            validation.number_in(f"make_optimizer.betas[{i}]", beta, 0.0, 1.0, high_open=True)


def check_settings(total_steps: int) -> None:
    """The schedule's gin settings, checked before a run builds anything (the optimizer's are checked when it is
    built, before the input pipeline)."""
    learning_rate(0, total_steps)


def _bound(configurable: str, parameter: str, default: object) -> object:
    try:
        return gin.query_parameter(f"{configurable}.{parameter}")
    except ValueError:  # not bound: the default
        return default


def make_optimizer_name() -> str:
    """The optimizer `make_optimizer` will build under the current gin bindings."""
    return _bound("make_optimizer", "name", "adafactor")


@gin.configurable
def learning_rate(step: int, total_steps: int, name: str = "rsqrt", base: float = 1.0,
                  warmup_steps: int = 10_000) -> float:
    """Learning rate at `step` (0-based: the step about to be taken)."""
    validation.number_in("learning_rate.base", base, 0.0, low_open=True)
    validation.whole_number("learning_rate.warmup_steps", warmup_steps)
    s = step + 1
    if name == "rsqrt":
        return base / math.sqrt(max(s, warmup_steps))
    warm = min(1.0, s / warmup_steps) if warmup_steps else 1.0
    if name == "constant":
        return base * warm
    progress = min(1.0, max(0.0, (s - warmup_steps) / max(1, total_steps - warmup_steps)))
    if name == "linear":
        return base * warm * (1.0 - progress)
    if name == "cosine":
        return base * warm * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"learning_rate.name={name!r}: use 'rsqrt', 'constant', 'linear' or 'cosine'")
