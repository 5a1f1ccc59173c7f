"""Training strategies and mixing-rate sweeps as arms of an experiment: each a small gin-configurable function.

An arm is a list of stages; a stage trains a task or mixture (from scratch or from another stage's checkpoint)
under a gin scope, then evaluates named tasks. Stages are named by what they compute, so arms that share one (a
multi-task pretraining reused by every per-task fine-tune) share its directory and it runs once. A new strategy is
one more function here (and a gin file under gin/experiments/ that selects it).

Step budgets follow the T5 paper's proportions: 2**19 pre-training steps, 2**18 fine-tuning steps, and the same
total for strategies without fine-tuning, all multiplied by `budget` (`steps_for`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import gin
import seqio

from mtplatform import mixing, validation

PAPER_PRETRAIN_STEPS = 2**19
PAPER_FINETUNE_STEPS = 2**18
STRATEGIES = ("training_strategies", "mixing_strategies", "pretrain_then_finetune", "pretraining_objectives",
              "low_resource", "online_mixing", "compression")
"""The strategy functions below: their settings say how arms are made, so they are no part of a stage's config."""


@dataclass(frozen=True)
class Stage:
    """Train `train_on` for `steps` steps under gin scope `scope`, from stage `init`'s checkpoint or from scratch;
    then evaluate `evaluate` on the checkpoints it wrote. `teacher`: a stage whose last checkpoint this one is
    distilled from (`mtplatform.distill`). `steps = 0` with `init`: no training, `init`'s last checkpoint evaluated,
    in int8 where `quantize = "int8"`."""

    name: str
    train_on: str
    steps: int
    scope: str = "pretrain"
    init: str | None = None
    evaluate: tuple[str, ...] = ()
    reference: str | None = None  # a stage whose last checkpoint is this one's reference model (online DoReMi)
    teacher: str | None = None
    quantize: str | None = None

    def depends_on(self) -> tuple[str, ...]:
        """The stages whose checkpoints this one reads: its init, reference and teacher."""
        return tuple(d for d in (self.init, self.reference, self.teacher) if d)


@dataclass(frozen=True)
class Arm:
    """One row of an experiment's table: its stages, in order; each task's score comes from the stage that
    evaluated it."""

    name: str
    stages: tuple[Stage, ...]
    mixture: str | None = None  # the multi-task mixture the arm trained on, for the shares plot
    notes: dict = field(default_factory=dict)


REFERENCE = {"reference": True}
"""An arm's notes that make it the one the report compares every other arm with (training from scratch: did
pre-training pay?)."""


def steps_for(budget: float) -> tuple[int, int]:
    """(pre-training, fine-tuning) steps: the paper's 2**19 and 2**18 times `budget`, at least 1 each."""
    validation.number_in("BUDGET", budget, 0.0, low_open=True, meaning="a share of the paper's steps")
    return max(1, round(PAPER_PRETRAIN_STEPS * budget)), max(1, round(PAPER_FINETUNE_STEPS * budget))


def _finetunes(prefix: str, init: Stage | None, tasks: Sequence[str], steps: int) -> tuple[Stage, ...]:
    return tuple(Stage(f"{prefix}_ft_{t}", t, steps, "finetune", init.name if init else None, (t,)) for t in tasks)


def _derived_mixture(name: str, tasks: Sequence[str], **settings) -> str:
    """A mixture made for an experiment (leave-one-out over its tasks, a sweep's rates): registered now."""
    mixing.register(name, list(tasks), replace_existing=True, **settings)
    return name


@gin.configurable
def training_strategies(
    tasks: Sequence[str] = gin.REQUIRED,
    unsupervised_task: str = "span_corruption",
    budget: float = gin.REQUIRED,
    include: Sequence[str] = ("unsupervised_pretrain_finetune", "multitask", "multitask_pretrain_finetune",
                              "leave_one_out", "supervised_pretrain_finetune", "no_pretraining"),
) -> list[Arm]:
    """The five strategies of T5's Table 12 and Table 1's no-pre-training baseline, over `tasks`."""
    pre, ft = steps_for(budget)
    everything = _derived_mixture("exp_supervised_and_unsupervised", [*tasks, unsupervised_task])
    supervised = _derived_mixture("exp_supervised", tasks)
    unsup = Stage("unsupervised_pretrain", unsupervised_task, pre)
    mt_pre = Stage("multitask_pretrain", everything, pre)
    sup_pre = Stage("supervised_pretrain", supervised, pre)
    arms = {
        "unsupervised_pretrain_finetune": Arm("unsupervised pre-training + fine-tuning",
                                              (unsup, *_finetunes("unsupervised", unsup, tasks, ft))),
        "multitask": Arm("multi-task training", (Stage("multitask", everything, pre + ft, evaluate=tuple(tasks)),),
                         mixture=everything),
        "multitask_pretrain_finetune": Arm("multi-task pre-training + fine-tuning",
                                           (mt_pre, *_finetunes("multitask", mt_pre, tasks, ft)), mixture=everything),
        "leave_one_out": Arm("leave-one-out multi-task training + fine-tuning", _leave_one_out(
            tasks, unsupervised_task, pre, ft)),
        "supervised_pretrain_finetune": Arm("supervised multi-task pre-training + fine-tuning",
                                            (sup_pre, *_finetunes("supervised", sup_pre, tasks, ft)),
                                            mixture=supervised),
        "no_pretraining": Arm("no pre-training (each task from scratch)",
                              tuple(Stage(f"scratch_{t}", t, pre + ft, "scratch", None, (t,)) for t in tasks),
                              notes=dict(REFERENCE)),
    }
    unknown = [name for name in include if name not in arms]
    if unknown:
        raise ValueError(f"training_strategies.include: unknown strategy {unknown[0]!r}; known: {', '.join(arms)}")
    return [arms[name] for name in include]


def _leave_one_out(tasks: Sequence[str], unsupervised_task: str, pre: int, ft: int) -> tuple[Stage, ...]:
    stages = []
    for task in tasks:
        mixture = _derived_mixture(f"exp_leave_one_out_{task}", [*[t for t in tasks if t != task], unsupervised_task])
        pretrain = Stage(f"leave_one_out_{task}", mixture, pre)
        stages += [pretrain, Stage(f"leave_one_out_ft_{task}", task, ft, "finetune", pretrain.name, (task,))]
    return tuple(stages)


@gin.configurable
def mixing_strategies(
    tasks: Sequence[str] = gin.REQUIRED,
    unsupervised_task: str = "span_corruption",
    budget: float = gin.REQUIRED,
    caps: Sequence[int] = (2**12, 2**14, 2**16, 2**18),
    temperatures: Sequence[float] = (2.0, 4.0, 8.0),
    temperature_cap: int | None = 2**16,
    unimax_epochs: float = 1.0,
    extra: Mapping[str, Mapping] | None = None,
) -> list[Arm]:
    """T5's Table 11: multi-task training on `tasks` and the unsupervised task with equal, examples-proportional
    (each cap K), temperature-scaled (each T, at `temperature_cap`) and UniMax rates; `extra` adds arms as
    {name: mixing settings}. Each arm trains for the paper's pre-training + fine-tuning steps, then evaluates.

    An online arm with algorithm 'doremi' may name another arm as its reference (`'online': {'algorithm':
    'doremi', 'reference': 'proportional K=2^14'}`): that arm's model, trained with the same seed, is the
    reference (the experiment puts its checkpoint's path in, seed by seed)."""
    pre, ft = steps_for(budget)
    sweep: dict[str, dict] = {"equal": {"strategy": "equal"}}
    sweep.update({f"proportional K=2^{k.bit_length() - 1}": {"strategy": "proportional", "cap": k} for k in caps})
    sweep.update({f"temperature T={t:g}": {"strategy": "temperature", "temperature": t, "cap": temperature_cap}
                  for t in temperatures})
    sweep[f"UniMax N={unimax_epochs:g}"] = {"strategy": "unimax", "max_epochs": unimax_epochs}
    sweep.update({name: dict(settings) for name, settings in (extra or {}).items()})
    arms = []
    stage_of = {name: f"mix_{i}" for i, name in enumerate(sweep)}
    for i, (name, settings) in enumerate(sweep.items()):
        reference = (settings.get("online") or {}).get("reference")
        if reference in stage_of:
            settings = {**settings, "online": {**settings["online"], "reference": reference_placeholder(
                stage_of[reference])}}
        mixture = _derived_mixture(f"exp_mix_{i}", [*tasks, unsupervised_task], **settings)
        arms.append(Arm(name, (Stage(f"mix_{i}", mixture, pre + ft, evaluate=tuple(tasks),
                                     reference=stage_of.get(reference)),), mixture=mixture, notes={"mixing": settings}))
    return arms


@gin.configurable
def online_mixing(
    tasks: Sequence[str] = gin.REQUIRED,
    unsupervised_task: str = "span_corruption",
    budget: float = gin.REQUIRED,
    start: Mapping = gin.REQUIRED,
    start_name: str = gin.REQUIRED,
    online: Mapping[str, Mapping] = gin.REQUIRED,
) -> list[Arm]:
    """Online mixing against the fixed rates it starts from: one arm at `start` (mixing settings, named
    `start_name`), one per entry of `online` ({arm name: `mixing.online` settings}) starting from `start`'s shares.
    A DoReMi entry with `'reference': 'start'` takes the fixed arm's model of the same seed as its reference. Each
    trains the paper's pre-training + fine-tuning steps; evaluated often (`experiment.evals_per_stage`, with
    `experiment.decode_intermediate = False`), the target NLL curves say which reaches the fixed arm's last value
    in fewer steps."""
    pre, ft = steps_for(budget)
    everything = [*tasks, unsupervised_task]
    fixed = _derived_mixture("exp_online_start", everything, **start)
    arms = [Arm(start_name, (Stage("start", fixed, pre + ft, evaluate=tuple(tasks)),), mixture=fixed,
                notes={"mixing": dict(start)})]
    for i, (name, settings) in enumerate(online.items()):
        settings = {"initial": start["strategy"], **settings}
        reference = "start" if settings.get("reference") == "start" else None
        if reference:
            settings["reference"] = reference_placeholder(reference)
        declared = {**{k: v for k, v in start.items() if k != "strategy"}, "strategy": "online", "online": settings}
        mixture = _derived_mixture(f"exp_online_{i}", everything, **declared)
        arms.append(Arm(name, (Stage(f"online_{i}", mixture, pre + ft, evaluate=tuple(tasks), reference=reference),),
                        mixture=mixture, notes={"mixing": declared}))
    return arms


def reference_placeholder(stage: str) -> str:
    """What an online mixture's `reference` holds until the experiment knows the path of `stage`'s model."""
    return f"<the model of stage {stage}>"


def with_reference(stage: Stage, model_dir: str) -> None:
    """Re-register `stage`'s online mixture with its reference stage's model directory (this seed's)."""
    mixture = seqio.get_mixture_or_task(stage.train_on)
    declared = dict(mixture.declared)
    declared["online"] = {**declared["online"], "reference": model_dir}
    mixing.register(stage.train_on, [t.name for t in mixture.all_tasks], replace_existing=True, **declared)


@gin.configurable
def pretrain_then_finetune(
    mixture: str = gin.REQUIRED,
    tasks: Sequence[str] = gin.REQUIRED,
    pretrain_steps: int = gin.REQUIRED,
    finetune_steps: int = gin.REQUIRED,
    from_scratch_baseline: bool = True,
) -> list[Arm]:
    """The demo's two arms: pre-train on `mixture` then fine-tune on each task, beside each task trained from
    scratch for the same total steps (so the table says whether pre-training paid). `finetune_steps = 0` is
    multi-task training alone, evaluated on every task."""
    if finetune_steps == 0:
        arms = [Arm(f"multi-task training on {mixture}",
                    (Stage("pretrain", mixture, pretrain_steps, evaluate=tuple(tasks)),), mixture=mixture)]
    else:
        pre = Stage("pretrain", mixture, pretrain_steps)
        arms = [Arm(f"pre-train on {mixture} + fine-tune", (pre, *_finetunes("pretrained", pre, tasks,
                                                                             finetune_steps)), mixture=mixture)]
    if from_scratch_baseline:
        arms.append(Arm("from scratch, same total steps", tuple(
            Stage(f"scratch_{t}", t, pretrain_steps + finetune_steps, "scratch", None, (t,)) for t in tasks),
            notes=dict(REFERENCE)))
    return arms


@gin.configurable
def pretraining_objectives(
    objectives: Sequence[str] = gin.REQUIRED,
    tasks: Sequence[str] = gin.REQUIRED,
    budget: float = gin.REQUIRED,
    from_scratch_baseline: bool = True,
) -> list[Arm]:
    """T5's Tables 4 to 7 (and BERT's, SpanBERT's, BART's objectives beside them): one model pre-trained per
    objective for the same steps, each fine-tuned on every task; and each task from scratch for the same total."""
    pre, ft = steps_for(budget)
    arms = []
    for objective in objectives:
        pretrain = Stage(f"pretrain_{objective}", objective, pre)
        arms.append(Arm(objective, (pretrain, *_finetunes(objective, pretrain, tasks, ft))))
    if from_scratch_baseline:
        arms.append(Arm("no pre-training (each task from scratch)",
                        tuple(Stage(f"scratch_{t}", t, pre + ft, "scratch", None, (t,)) for t in tasks),
                        notes=dict(REFERENCE)))
    return arms


@gin.configurable
def low_resource(
    tasks: Sequence[str] = gin.REQUIRED,
    sizes: Sequence[int | None] = gin.REQUIRED,
    pretrain_steps: int = gin.REQUIRED,
    finetune_steps: int = gin.REQUIRED,
    unsupervised_task: str = "span_corruption",
    multitask_tasks: Sequence[str] = (),
) -> list[Arm]:
    """Where pre-training starts to pay: each task cut to each number of labelled training examples (`sizes`; None
    is all of them; `tasks.subsets`), fine-tuned for `finetune_steps` from a model pre-trained on
    `unsupervised_task` and, with `multitask_tasks`, from one pre-trained on those tasks and the unsupervised one
    (none of `tasks`: the labelled examples being rationed must not leak in), beside the same subset trained from
    scratch for the same steps on the task. Pre-training is shared by every size, so its cost is paid once."""
    from tasks import subsets  # the catalogue's own: a subset is a task read from the files a task reads

    leaked = sorted(set(tasks) & set(multitask_tasks))
    if leaked:
        raise ValueError(f"low_resource.multitask_tasks holds {leaked}, which the experiment rations: drop them")
    subset_of = {subsets.register_subset(t, n): (t, n) for t in tasks for n in sizes}
    available = {t: seqio.get_mixture_or_task(t).num_input_examples("train") for t in tasks}
    notes = {"train_examples": {name: {"task": t, "examples": min(n or available[t], available[t]), "all": n is None}
                                for name, (t, n) in subset_of.items()}}  # a cap above the task's size is all of it
    unsup = Stage("unsupervised_pretrain", unsupervised_task, pretrain_steps)
    arms = [Arm(f"pre-trained on {unsupervised_task}", (unsup, *_finetunes("unsupervised", unsup, list(subset_of),
                                                                           finetune_steps)), notes=notes)]
    if multitask_tasks:
        mixture = _derived_mixture("exp_low_resource_multitask", [*multitask_tasks, unsupervised_task])
        multi = Stage("multitask_pretrain", mixture, pretrain_steps)
        arms.append(Arm("pre-trained multi-task", (multi, *_finetunes("multitask", multi, list(subset_of),
                                                                       finetune_steps)), mixture=mixture, notes=notes))
    arms.append(Arm("from scratch", tuple(Stage(f"scratch_{t}", t, finetune_steps, "scratch", None, (t,))
                                         for t in subset_of), notes={**notes, **REFERENCE}))
    return arms


@gin.configurable
def compression(
    tasks: Sequence[str] = gin.REQUIRED,
    teacher_steps: int = gin.REQUIRED,
    student_steps: int = gin.REQUIRED,
) -> list[Arm]:
    """Issue 30's comparison on multi-task training over `tasks`: the teacher (scope `teacher`: the largest model
    of the experiment), the same teacher evaluated in int8, a smaller student trained from scratch (`student`), the
    same student distilled from the teacher (`distill`), and the teacher's shape with ALBERT's cross-layer sharing
    and factorized embedding (`albert`), each evaluated on every task. The scopes' model settings are the gin
    file's (gin/experiments/compression.gin)."""
    validation.positive_int("compression.teacher_steps", teacher_steps)
    validation.positive_int("compression.student_steps", student_steps)
    mixture = _derived_mixture("exp_compression", tasks)
    evaluate = tuple(tasks)
    teacher = Stage("teacher", mixture, teacher_steps, "teacher", evaluate=evaluate)
    return [  # the teacher's arm comes first: the arms that read its checkpoint name it as their stages' init/teacher
        Arm("teacher", (teacher,), mixture=mixture),
        Arm("teacher in int8", (Stage("teacher_int8", mixture, 0, "teacher", "teacher", evaluate,
                                      quantize="int8"),), mixture=mixture),
        Arm("student from scratch", (Stage("student", mixture, student_steps, "student", evaluate=evaluate),),
            mixture=mixture, notes=dict(REFERENCE)),
        Arm("distilled student", (Stage("distilled", mixture, student_steps, "distill", evaluate=evaluate,
                                        teacher="teacher"),), mixture=mixture),
        Arm("shared blocks + factorized embedding", (Stage("albert", mixture, teacher_steps, "albert",
                                                           evaluate=evaluate),), mixture=mixture),
    ]
