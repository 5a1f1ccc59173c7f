"""Online mixing: rates that follow each task's training loss while a run trains (`mixing.strategy = 'online'`).

Two algorithms (`mixing.online.algorithm`), each updating the shares every `update_every` steps from the losses
measured in the packed stream over the steps since the last update (summed over processes, so every process
computes the same shares):
- `odm`, Albalak et al. 2023 ("Efficient Online Data Mixing"): each task is an arm of an EXP3 bandit whose reward
  is its training loss, importance-weighted by the share it was drawn with and smoothed (R_i <- a R_i + (1 - a)
  L_i / p_i, `reward_decay` a = 0.9); shares are (1 - K e_t) softmax(log p0 + step_size e_(t-1) R) + e_t with
  exploration e_t = min(1/K, sqrt(ln K / (K t))) at update t (or `exploration`, fixed). No reference model.
- `doremi`, Xie et al. 2023 ("DoReMi"), online: the excess loss of each task over a reference model given by path
  (`reference`, the same shapes and vocabulary), lambda_i = mean over its target tokens of max(loss - loss_ref, 0),
  raises its log-share by `step_size` x lambda_i (exponentiated gradient), then shares are smoothed towards uniform
  by `smoothing` (DoReMi's c, 1e-3). DoReMi proper trains a small proxy this way and then a large model on the
  averaged shares; here the run itself trains on the current shares, as ODM's does.

Both start from `initial`, any fixed strategy's shares (with its usual `mixing.*` settings), keep them for
`warmup_steps`, and never put a task under `floor`. The state (shares, rewards, update count, the window's sums)
is saved with each checkpoint, so that a resumed run updates exactly as an uninterrupted one.

Why rates that change fit the data stream: see `online_stream.OnlineStream` (per-task iterators, a seeded sampler
whose state is saved, and first-fit packing in numpy, each batch drawn at the step that uses it).

This module knows numpy and gin, not torch or TensorFlow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace

import gin
import numpy as np

ALGORITHMS = ("odm", "doremi")


class OnlineError(ValueError):
    """Invalid online-mixing settings; the message names the mixture and the setting."""


@dataclass(frozen=True)
class OnlineSettings:
    """`mixing.online.*`: how an online run's shares move."""

    algorithm: str = "odm"
    initial: str = "proportional"  # any fixed mixing.strategy; its parameters are the usual mixing.* settings
    update_every: int = 1  # steps between updates (both papers update every step)
    step_size: float = 1.0  # ODM: multiplies the exploration rate in the exponent; DoReMi's eta
    exploration: float | None = None  # ODM's e_t; None: min(1/K, sqrt(ln K / (K t)))
    reward_decay: float = 0.9  # ODM's smoothing of rewards (alpha)
    smoothing: float = 1e-3  # DoReMi's c: the share of uniform mixed into the shares
    warmup_steps: int = 0  # shares stay at `initial` until this step
    floor: float = 0.0  # the least share of any task
    reference: str | None = None  # DoReMi: the reference model's checkpoint (or Hugging Face directory)

    def check(self, mixture: str, fixed_strategies: Sequence[str], num_tasks: int | None = None) -> None:
        """A one-line error naming the mixture and the setting at fault."""
        where = f"mixture {mixture}: mixing.online"
        if self.algorithm not in ALGORITHMS:
            raise OnlineError(f"{where}.algorithm = {self.algorithm!r} is none of {', '.join(ALGORITHMS)}")
        if self.initial not in fixed_strategies:
            raise OnlineError(f"{where}.initial = {self.initial!r} must be a fixed strategy: "
                              f"{', '.join(fixed_strategies)}")
        for name in ("update_every", "warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "update_every" else 0):
                raise OnlineError(f"{where}.{name} = {value!r} must be an integer >= "
                                  f"{1 if name == 'update_every' else 0}")
        _number(where, "step_size", self.step_size, 0.0, math.inf, low_open=True)
        _number(where, "reward_decay", self.reward_decay, 0.0, 1.0, high_open=True)
        _number(where, "smoothing", self.smoothing, 0.0, 1.0)
        if self.exploration is not None:
            _number(where, "exploration", self.exploration, 0.0, 1.0 / (num_tasks or 1))
        high = 1.0 / num_tasks if num_tasks else 1.0
        _number(where, "floor", self.floor, 0.0, high, high_open=True,
                meaning=f"1/K, K = {num_tasks} tasks" if num_tasks else "")
        if self.algorithm == "doremi" and not self.reference:
            raise OnlineError(f"{where}.algorithm = 'doremi' needs mixing.online.reference = '<checkpoint of a "
                              "reference model>'")
        if self.algorithm == "odm" and self.reference:
            raise OnlineError(f"{where}.reference is set but algorithm 'odm' uses no reference; use 'doremi' or "
                              "unset it")


def _number(where: str, name: str, value, low: float, high: float, low_open: bool = False, high_open: bool = False,
            meaning: str = "") -> None:
    ok = (not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
          and (value > low if low_open else value >= low) and (value < high if high_open else value <= high))
    if not ok:
        bounds = f"{'>' if low_open else '>='} {low:.4g} and {'<' if high_open else '<='} {high:.4g}"
        raise OnlineError(f"{where}.{name} = {value!r} must be a number {bounds}{f' ({meaning})' if meaning else ''}")


DEFAULTS = OnlineSettings()
_UNSET = object()


@gin.configurable("online", module="mixing")
def bound_settings(
    algorithm=_UNSET, initial=_UNSET, update_every=_UNSET, step_size=_UNSET, exploration=_UNSET,
    reward_decay=_UNSET, smoothing=_UNSET, warmup_steps=_UNSET, floor=_UNSET, reference=_UNSET,
) -> dict:
    """The `mixing.online.*` parameters gin binds in the current scope (and only those)."""
    values = dict(algorithm=algorithm, initial=initial, update_every=update_every, step_size=step_size,
                  exploration=exploration, reward_decay=reward_decay, smoothing=smoothing,
                  warmup_steps=warmup_steps, floor=floor, reference=reference)
    return {k: v for k, v in values.items() if v is not _UNSET}


def settings_for(declared: Mapping | None, mixture: str = "?") -> OnlineSettings:
    """DEFAULTS, overridden by a mixture's declared `online` settings, overridden by gin's `mixing.online.*`."""
    values = {**dict(declared or {}), **bound_settings()}
    unknown = sorted(set(values) - {f.name for f in fields(OnlineSettings)})
    if unknown:
        raise OnlineError(f"mixture {mixture}: unknown online setting(s) {', '.join(unknown)}; settings are "
                          f"{', '.join(f.name for f in fields(OnlineSettings))}")
    return replace(DEFAULTS, **values)


class OnlineMixer:
    """The current shares of an online run and the state that moves them (saved with each checkpoint)."""

    def __init__(self, settings: OnlineSettings, names: Sequence[str], initial: Mapping[str, float],
                 state: Mapping | None = None):
        self.settings, self.names = settings, list(names)
        k = len(self.names)
        prior = np.array([initial[t] for t in self.names], dtype=np.float64)
        self.prior = prior / prior.sum()
        self.shares = _floored(self.prior.copy(), settings.floor)
        self.rewards = np.zeros(k)  # ODM's smoothed, importance-weighted losses
        self.log_weights = np.log(np.maximum(self.prior, 1e-300))  # DoReMi's log-shares before the floor
        self.updates = 0
        self.last_exploration = 1.0 / k
        self.window = np.zeros((3, k))  # loss sum, target tokens, excess-loss sum over the steps since the update
        if state:
            self._load(state)

    @property
    def needs_reference(self) -> bool:
        return self.settings.algorithm == "doremi"

    def observe(self, step: int, loss_sum: np.ndarray, tokens: np.ndarray, excess_sum: np.ndarray | None) -> bool:
        """Add one step's per-task sums (over processes); update the shares at the end of a window after the
        warm-up. True when the shares changed (the stream must draw by them from the next step)."""
        self.window += np.stack([loss_sum, tokens, excess_sum if excess_sum is not None else np.zeros_like(tokens)])
        if step % self.settings.update_every:
            return False
        window, self.window = self.window, np.zeros_like(self.window)
        if step <= self.settings.warmup_steps:
            return False
        seen = window[1] > 0
        if not seen.any():
            return False
        if self.settings.algorithm == "odm":
            self._odm(np.where(seen, window[0] / np.maximum(window[1], 1.0), 0.0), seen)
        else:
            self._doremi(np.where(seen, window[2] / np.maximum(window[1], 1.0), 0.0))
        self.updates += 1
        return True

    def _odm(self, losses: np.ndarray, seen: np.ndarray) -> None:
        s, k = self.settings, len(self.names)
        t = self.updates + 1
        reward = losses / np.maximum(self.shares, 1e-12)
        self.rewards = np.where(seen, s.reward_decay * self.rewards + (1.0 - s.reward_decay) * reward, self.rewards)
        explore = s.exploration if s.exploration is not None else min(1.0 / k, math.sqrt(math.log(k) / (k * t)))
        logits = np.log(np.maximum(self.prior, 1e-300)) + s.step_size * self.last_exploration * self.rewards
        shares = (1.0 - k * explore) * _softmax(logits) + explore
        self.last_exploration = explore
        self.shares = _floored(shares, s.floor)

    def _doremi(self, excess: np.ndarray) -> None:
        s, k = self.settings, len(self.names)
        shares = _softmax(self.log_weights + s.step_size * excess)
        shares = (1.0 - s.smoothing) * shares + s.smoothing / k
        self.log_weights = np.log(shares)
        self.shares = _floored(shares, s.floor)

    def log_values(self) -> dict[str, float]:
        """`rate/<task>`: the share each task is drawn with now."""
        return {f"rate/{t}": float(p) for t, p in zip(self.names, self.shares, strict=True)}

    def state(self) -> dict:
        return {"names": self.names, "shares": self.shares.tolist(), "rewards": self.rewards.tolist(),
                "log_weights": self.log_weights.tolist(), "updates": self.updates,
                "last_exploration": self.last_exploration, "window": self.window.tolist(),
                "settings": asdict(self.settings)}

    def _load(self, state: Mapping) -> None:
        if list(state["names"]) != self.names:
            raise OnlineError(f"the saved online-mixing state is over tasks {state['names']}, this run's are "
                              f"{self.names}")
        self.shares = np.array(state["shares"])
        self.rewards = np.array(state["rewards"])
        self.log_weights = np.array(state["log_weights"])
        self.updates, self.last_exploration = int(state["updates"]), float(state["last_exploration"])
        self.window = np.array(state["window"])


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max())
    return z / z.sum()


def _floored(shares: np.ndarray, floor: float) -> np.ndarray:
    """`shares` (summing to 1) moved so that none is below `floor` (< 1/K): floor + (1 - K floor) x shares."""
    shares = shares / shares.sum()
    return floor + (1.0 - len(shares) * floor) * shares if floor else shares
