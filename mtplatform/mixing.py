"""Mixing rates: how often a multi-task stream draws from each of its tasks, set by a strategy gin can change.

A mixture registered here (`register`) is a `seqio.Mixture` whose rates are computed when they are asked for, from
the strategy then configured: `--gin.mixing.strategy='temperature' --gin.mixing.temperature=2.0` changes the rates
of an already registered mixture, and a gin scope changes them for one stage of an experiment
(`pretrain/mixing.temperature = 2.0`). Precedence: gin `mixing.*` bindings, then the mixture's own declaration
(`register(..., cap=None)` or a gin-declared mixture's entries), then `DEFAULTS`.

Strategies, over each task's training-set size n (an unsupervised task takes the artificial size
`unsupervised_size`, as `t5.data.rate_unsupervised` gives its C4 task a fixed rate, since a corpus's size is
arbitrary):
- `proportional`: min(n, K) with the artificial cap K (`cap`; None for none), the T5 paper's examples-proportional;
- `temperature`: min(n, K) ** (1 / T), T5's temperature-scaled mixing (T = 1 is proportional; multilingual BERT's
  exponent S is 1 / T);
- `equal`: the same rate for every task;
- `explicit`: `weights`, a rate per task;
- `unimax` (Chung et al. 2023): a budget of examples (`budget_examples`, by default the examples the run trains on:
  its steps x batch rows, times the examples a packed row holds, measured by `data.budget_examples`) spread as
  uniformly as possible over the tasks such that no task is repeated more than `max_epochs` times.

Tasks without training data: a task of a mixture whose training file is missing is an error naming the task and
the file, unless `mixing.drop_tasks_without_data = True`, which drops it from the mixture (and says so).

This module knows seqio and gin, not torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace

import gin
import seqio

from mtplatform import online_mixing
from mtplatform import settings as app_settings

FIXED_STRATEGIES = ("proportional", "temperature", "equal", "explicit", "unimax")
STRATEGIES = (*FIXED_STRATEGIES, "online")
DROP_SWITCH = "mixing.drop_tasks_without_data"

# Tasks whose size is arbitrary (text corpora): they take `unsupervised_size` instead of their line count.
UNSUPERVISED_TASKS: set[str] = set()


class MixingError(ValueError):
    """A mixture or its rate settings are invalid; the message names the mixture, task or setting."""


@dataclass(frozen=True)
class Settings:
    """One strategy with its parameters, as resolved for one mixture."""

    strategy: str = "proportional"
    cap: float | None = 2**14  # K; the T5 paper swept 2**16..2**21 on full-size GLUE and C4
    temperature: float = 1.0
    weights: Mapping[str, float] | None = None
    max_epochs: float = 1.0  # UniMax's N
    budget_examples: float | None = None  # UniMax's budget; None: the examples the run trains on (data.py)
    unsupervised_size: float = 1e6  # t5.data.rate_unsupervised's default value
    drop_tasks_without_data: bool = False
    online: Mapping | None = None  # strategy 'online': its settings (online_mixing.OnlineSettings), gin's added

    def check(self, mixture: str) -> None:
        """A one-line error naming the mixture and the setting at fault."""
        where = f"mixture {mixture}"
        if self.strategy not in STRATEGIES:
            raise MixingError(f"{where}: mixing.strategy={self.strategy!r} is none of {', '.join(STRATEGIES)}")
        for setting, label in (("cap", "mixing.cap (K)"), ("temperature", "mixing.temperature (T)"),
                               ("max_epochs", "mixing.max_epochs"), ("unsupervised_size", "mixing.unsupervised_size"),
                               ("budget_examples", "mixing.budget_examples")):
            value = getattr(self, setting)
            if value is None and setting in ("cap", "budget_examples"):
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not (0 < value < math.inf):
                none = ", or None for no cap" if setting == "cap" else ""
                raise MixingError(f"{where}: {label} = {value!r} must be a finite number > 0{none}")
        initial = self.strategy
        if self.strategy == "online":
            online = online_mixing.settings_for(self.online, mixture)
            online.check(mixture, FIXED_STRATEGIES)
            initial = online.initial
        if initial == "explicit" and not self.weights:
            raise MixingError(f"{where}: mixing.strategy='explicit' needs mixing.weights = {{task: rate, ...}}")

    def complete(self, mixture: str = "?") -> Settings:
        """These settings with an online strategy's settings resolved (gin's `mixing.online.*` bindings and the
        defaults added), as a run records them."""
        if self.strategy != "online":
            return self
        return replace(self, online=asdict(online_mixing.settings_for(self.online, mixture)))

    @property
    def initial(self) -> Settings:
        """The fixed strategy whose rates a run starts from: itself, or an online strategy's `initial`."""
        if self.strategy != "online":
            return self
        return replace(self, strategy=online_mixing.settings_for(self.online).initial)


DEFAULTS = Settings()
_UNSET = object()


@gin.configurable("mixing")
def bound_settings(
    strategy=_UNSET, cap=_UNSET, temperature=_UNSET, weights=_UNSET, max_epochs=_UNSET, budget_examples=_UNSET,
    unsupervised_size=_UNSET, drop_tasks_without_data=_UNSET, online=_UNSET,
) -> dict:
    """The `mixing.*` parameters that gin binds in the current scope (and only those), to override declarations.
    (`mixing.online.*` bindings are `online_mixing`'s; `mixing.online = {...}` sets a whole online declaration.)"""
    values = dict(strategy=strategy, cap=cap, temperature=temperature, weights=weights, max_epochs=max_epochs,
                  budget_examples=budget_examples, unsupervised_size=unsupervised_size,
                  drop_tasks_without_data=drop_tasks_without_data, online=online)
    return {k: v for k, v in values.items() if v is not _UNSET}


def settings_for(declared: Mapping | None = None) -> Settings:
    """DEFAULTS, overridden by a mixture's declaration, overridden by gin's `mixing.*` bindings."""
    return replace(DEFAULTS, **{**dict(declared or {}), **bound_settings()})


# --- rates from sizes (pure) ------------------------------------------------------------------------------------


def rates_from_sizes(sizes: Mapping[str, float], settings: Settings, mixture: str = "?") -> dict[str, float]:
    """Each task's rate (unnormalised) under `settings`, given each task's number of training examples.

    seqio.mixing_rate_num_examples computes proportional and temperature rates one task at a time; it is not used
    here because UniMax and the checks below need all the tasks at once, and because it logs a warning on every
    call for an uncached task. `tests/test_mixing.py` checks that the two agree on the built-in tasks.
    """
    settings.check(mixture)
    settings = settings.initial  # an online strategy starts from a fixed one's rates
    capped = {t: min(n, settings.cap) if settings.cap is not None else n for t, n in sizes.items()}
    if settings.strategy == "proportional":
        rates = capped
    elif settings.strategy == "temperature":
        rates = {t: n ** (1.0 / settings.temperature) for t, n in capped.items()}
    elif settings.strategy == "equal":
        rates = dict.fromkeys(sizes, 1.0)
    elif settings.strategy == "explicit":
        rates = _explicit(sizes, settings.weights or {}, mixture)
    else:
        rates = unimax(sizes, settings.budget_examples, settings.max_epochs, mixture)
    return _checked(rates, mixture, settings.strategy)


def _checked(rates: Mapping[str, object], mixture: str, how: str) -> dict[str, float]:
    """`rates` as floats, each finite and >= 0 and not all zero (seqio would divide by their sum)."""
    for task, rate in rates.items():
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not (rate >= 0 and math.isfinite(rate)):
            raise MixingError(f"mixture {mixture}: task {task} has rate {rate!r} ({how}); rates must be finite and "
                              ">= 0")
    if not any(rates.values()):
        raise MixingError(f"mixture {mixture}: every task's rate is zero ({how})")
    return {task: float(rate) for task, rate in rates.items()}  # floats, also where a cap K made every rate an int


def _explicit(sizes: Mapping[str, float], weights: Mapping[str, float], mixture: str) -> dict[str, float]:
    unknown = sorted(set(weights) - set(sizes))
    if unknown:
        raise MixingError(f"mixture {mixture}: mixing.weights names {', '.join(unknown)}, not in the mixture "
                          f"({', '.join(sizes)})")
    missing = [t for t in sizes if t not in weights]
    if missing:
        raise MixingError(f"mixture {mixture}: mixing.weights has no rate for task {missing[0]}")
    return {t: float(weights[t]) for t in sizes}


def unimax(sizes: Mapping[str, float], budget: float | None, max_epochs: float, mixture: str = "?") -> dict[str, float]:
    """UniMax (Chung et al. 2023, Algorithm 1): examples allocated per task.

    Tasks are visited from the smallest; each takes an equal share of the budget still left, but at most
    `max_epochs` epochs of its data; what it cannot use goes to the larger tasks. The result is the most uniform
    allocation in which no task repeats more than `max_epochs` epochs (when the budget exceeds what all tasks can
    give at `max_epochs`, every task gets exactly that many epochs).
    """
    if budget is None:
        raise MixingError(f"mixture {mixture}: mixing.strategy='unimax' needs a budget: set mixing.budget_examples, "
                          "or train (the budget is then the examples in the run's TRAIN_STEPS x BATCH_SIZE rows)")
    left = float(budget)
    order = sorted(sizes, key=lambda t: (sizes[t], t))
    allocation = {}
    for i, task in enumerate(order):
        allocation[task] = min(left / (len(order) - i), max_epochs * sizes[task])
        left -= allocation[task]
    return {t: allocation[t] for t in sizes}


# --- mixtures -----------------------------------------------------------------------------------------------------


def training_size(task: seqio.Task, settings: Settings) -> float:
    """The n of the rate formulas: the training split's example count, or the artificial size of a corpus."""
    if task.name in UNSUPERVISED_TASKS:
        return settings.unsupervised_size
    n = task.num_input_examples("train")
    if n is None:
        raise MixingError(f"task {task.name}: its source does not know its number of training examples; "
                          "give one (num_input_examples) or mix it with mixing.strategy='explicit'")
    return float(n)


def missing_training_data(task: seqio.Task) -> str | None:
    """Why `task` has no training data here (the expected file), or None when it has or we cannot tell."""
    files = getattr(task.source, "files", None)  # tasks.sources.FileSource; other seqio sources cannot tell
    if files is None or "train" not in task.splits:
        return None
    try:
        files("train")
    except FileNotFoundError as e:
        return str(e)
    return None


@dataclass(frozen=True)
class Resolved:
    """A mixture's rates as a run uses them: tasks kept, their sizes and rates, tasks dropped and why.

    A run resolves its rates once, when it begins, records them (`record`, the run directory's `mixture.json`) and
    reads them back when it resumes (`from_record`): UniMax's measured budget is not measured again, and a resumed
    stream draws by the rates its saved position was drawn by. This is the value the data stream is built from;
    rates that change while training (online mixing) would replace it between steps."""

    mixture: str
    settings: Settings
    sizes: dict[str, float]
    rates: dict[str, float]
    dropped: dict[str, str] = field(default_factory=dict)

    @property
    def shares(self) -> dict[str, float]:
        total = sum(self.rates.values())
        return {t: r / total for t, r in self.rates.items()}

    def record(self) -> dict:
        """JSON-ready: the strategy and its settings, each task's size, rate and share, and dropped tasks."""
        settings = {k: v for k, v in asdict(self.settings).items() if k != "online" or v is not None}
        return {"mixture": self.mixture, "settings": settings,
                "tasks": {t: {"size": self.sizes[t], "rate": self.rates[t], "share": share}
                          for t, share in self.shares.items()},
                "dropped": self.dropped}

    @classmethod
    def from_record(cls, record: Mapping) -> Resolved:
        """The inverse of `record` (settings a record lacks, from before they existed, take their defaults)."""
        known = {f.name for f in fields(Settings)}
        settings = replace(DEFAULTS, **{k: v for k, v in record["settings"].items() if k in known})
        tasks = record["tasks"]
        return cls(record["mixture"], settings, {t: v["size"] for t, v in tasks.items()},
                   {t: v["rate"] for t, v in tasks.items()}, dict(record.get("dropped", {})))


class Mixture(seqio.Mixture):
    """A seqio Mixture whose rates follow the configured strategy when they are asked for (not when registered),
    and which can leave out its tasks that have no training data (`mixing.drop_tasks_without_data`)."""

    declared_in_gin = False  # set by register_declared(), which may then replace it

    def __init__(self, name: str, tasks: Sequence[str], declared: Mapping | None = None, default_rate=None,
                 **kwargs):
        del default_rate  # MixtureRegistry.add passes one; our rates come from the strategy
        self.declared = dict(declared or {})
        self._resolved_for: tuple[str | None, Resolved | None] = (None, None)
        super().__init__(name, list(tasks), default_rate=self._rate_of, **kwargs)

    @property
    def all_tasks(self) -> list[seqio.Task]:
        return super().tasks

    @property
    def tasks(self) -> list[seqio.Task]:
        """The tasks a run trains and evaluates on: all of them, or those with data when the switch says so."""
        if not settings_for(self.declared).drop_tasks_without_data:
            return self.all_tasks
        return [t for t in self.all_tasks if missing_training_data(t) is None]

    def resolve(self, budget_examples: float | None = None) -> Resolved:
        """Rates under the strategy configured now; a missing training file is an error unless dropped."""
        settings = settings_for(self.declared)
        settings.check(self.name)  # a misspelt strategy is the error, before any missing file
        settings = settings.complete(self.name)
        if settings.budget_examples is None and budget_examples is not None:
            settings = replace(settings, budget_examples=float(budget_examples))
        kept, dropped = [], {}
        for task in self.all_tasks:
            reason = missing_training_data(task)
            if reason is None:
                kept.append(task)
            elif settings.drop_tasks_without_data:
                dropped[task.name] = reason
            else:
                raise MixingError(f"mixture {self.name}: {reason}; to train on the tasks that have data, set "
                                  f"--gin.{DROP_SWITCH}=True")
        if not kept:
            raise MixingError(f"mixture {self.name}: no task has training data ({'; '.join(dropped.values())})")
        sizes = {t.name: training_size(t, settings) for t in kept}
        return Resolved(self.name, settings, sizes, rates_from_sizes(sizes, settings, self.name), dropped)

    def _rate_of(self, task: seqio.Task) -> float:
        """seqio's rate function: the rates under the settings bound now, resolved once per distinct settings and
        data directory (seqio asks once per task; resolving reads every task's size)."""
        try:
            where = str(app_settings.data_dir())
        except app_settings.SettingError:
            where = ""
        key = f"{settings_for(self.declared).complete(self.name)!r} in {where}"  # mixing.online.* bindings too
        if self._resolved_for[0] != key:
            self._resolved_for = (key, self.resolve())
        return self._resolved_for[1].rates.get(task.name, 0.0)


def needs_budget(provider: seqio.Task | seqio.Mixture) -> bool:
    """Whether `provider`'s rates depend on how many examples the run trains on (UniMax without its own budget)."""
    if not isinstance(provider, Mixture):
        return False
    settings = settings_for(provider.declared)
    return settings.initial.strategy == "unimax" and settings.budget_examples is None


def resolve(provider: seqio.Task | seqio.Mixture, budget_examples: float | None = None) -> Resolved:
    """Rates of any task or mixture: ours by strategy, a plain seqio.Mixture by its own rate functions."""
    if isinstance(provider, Mixture):
        return provider.resolve(budget_examples)
    if isinstance(provider, seqio.Task):
        return Resolved(provider.name, DEFAULTS, {provider.name: 1.0}, {provider.name: 1.0})
    rates = _checked({t.name: provider.get_rate(t) for t in provider.tasks}, provider.name, "seqio rates")
    return Resolved(provider.name, DEFAULTS, dict(rates), rates)


def register(name: str, tasks: Sequence[str], replace_existing: bool = False, **declared) -> Mixture:
    """Register mixture `name` over `tasks` (task or mixture names; a mixture stands for its tasks), with
    `declared` settings (see `Settings`) as its own defaults. One-line errors name the mixture and the task."""
    unknown_settings = set(declared) - {f.name for f in fields(Settings)}
    if unknown_settings:
        raise MixingError(f"mixture {name}: unknown setting(s) {', '.join(sorted(unknown_settings))}; "
                          f"settings are {', '.join(f.name for f in fields(Settings))}")
    settings_for(declared).check(name)
    names = _expand(name, tasks)
    _check_compatible(name, [seqio.TaskRegistry.get(t) for t in names])
    if replace_existing and name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(name)
    return seqio.MixtureRegistry.add(name, names, mixture_cls=Mixture, declared=declared)


def _expand(mixture: str, names: Sequence[str]) -> list[str]:
    if isinstance(names, str):
        raise MixingError(f"mixture {mixture}: tasks must be a list of names, not the string {names!r}")
    out: list[str] = []
    for item in names:
        if item in seqio.TaskRegistry.names():
            found = [item]
        elif item in seqio.MixtureRegistry.names():
            found = [t.name for t in seqio.MixtureRegistry.get(item).tasks]
        else:
            raise MixingError(f"mixture {mixture}: no task or mixture named {item!r} (see `mtp tasks list`)")
        out.extend(t for t in found if t not in out)
    if not out:
        raise MixingError(f"mixture {mixture}: it names no task")
    return out


def _check_compatible(mixture: str, tasks: Sequence[seqio.Task]) -> None:
    """seqio checks only the feature names at registration, and vocabularies only when a dataset is built."""
    first = tasks[0]
    for task in tasks[1:]:
        if set(task.output_features) != set(first.output_features):
            raise MixingError(f"mixture {mixture}: task {task.name} has output features "
                              f"{sorted(task.output_features)}, task {first.name} {sorted(first.output_features)}")
        for key, feature in first.output_features.items():
            other = task.output_features[key]
            if other.vocabulary != feature.vocabulary or other.dtype != feature.dtype:
                raise MixingError(f"mixture {mixture}: task {task.name} has another vocabulary or dtype for "
                                  f"feature {key!r} than task {first.name}")


@gin.configurable("mixtures")
def declared_mixtures(declared: Mapping[str, Mapping] | None = None) -> dict[str, dict]:
    """Mixtures declared in gin, without Python:

        mixtures.declared = {
            "small_glue_t2": {"tasks": ["glue_rte", "glue_mrpc", "span_corruption"],
                              "strategy": "temperature", "temperature": 2.0},
        }
    """
    return {name: dict(spec) for name, spec in (declared or {}).items()}


def register_declared() -> list[str]:
    """Register (or re-register, when changed) the mixtures declared in gin; return their names."""
    names = []
    for name, spec in declared_mixtures().items():
        spec = dict(spec)
        if "tasks" not in spec:
            raise MixingError(f"mixture {name} (mixtures.declared): no 'tasks' list")
        tasks = spec.pop("tasks")
        existing = seqio.MixtureRegistry.get(name) if name in seqio.MixtureRegistry.names() else None
        if existing is not None and not (isinstance(existing, Mixture) and existing.declared_in_gin):
            raise MixingError(f"mixture {name} (mixtures.declared): a mixture of that name is already registered "
                              "in Python; choose another name")
        mixture = register(name, tasks, replace_existing=True, **spec)
        mixture.declared_in_gin = True
        names.append(name)
    return names
