"""`mtp experiment`: run the arms of an experiment (lists of stages), evaluate, and write the report.

Each stage trains under its own gin scope (`pretrain/...`, `finetune/...`, `scratch/...`) into
`EXPERIMENT_DIR/<stage>/seed_<seed>/`, then evaluates its tasks on every checkpoint it wrote, with the same function
and settings as `mtp eval`. Stages shared by arms run once. Re-running continues where it stopped: a finished stage
is skipped, an interrupted one resumes exactly (its checkpoints), and a finished stage whose configuration changed
is an error naming it. The arms come from a strategy function (`mtplatform.strategies`) chosen in a gin file under
gin/experiments/; the report is `mtplatform.report`'s.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import gin
import torch

from mtplatform import catalog, checkpoints, distill, evaluate, mixing, quantize, report, strategies, validation
from mtplatform import train as train_lib

NOT_STAGE_SETTINGS = ("experiment", "mixture_search", *strategies.STRATEGIES)
"""Configurables that say how stages are made (arms, a search's proxies), not how one trains: no part of a stage's
configuration, so that adding an arm or proxy runs leaves finished stages valid."""


RECORD = "stage.json"  # in each stage directory: the stage's configuration, and its evaluations once finished


def stage_directory(root: Path, stage: str, seed: int) -> Path:
    return root / stage / f"seed_{seed}"


class StageChanged(ValueError):
    """A finished stage would now be configured differently; the message names the stage and the change."""


def _gin_lines(scope: str, train_on: str) -> list[str]:
    """The parsed gin bindings that apply under `scope` (unscoped ones and the scope's own) and the macros they use,
    without the experiment's own settings (how arms are made, not how a stage trains), and without the mixtures
    declared in gin unless the stage trains on one: adding an arm, a task or a declared mixture (a search's
    proposal.gin) to an experiment leaves its finished stages valid."""
    bindings = _bindings(gin.config_str())
    kept = {}
    for selector, text in bindings.items():
        scope_of, _, name = selector.rpartition("/")
        configurable = name.rpartition(".")[0].rpartition(".")[2]
        if configurable == "mixtures" and train_on not in mixing.declared_mixtures():
            continue
        if "." in name and scope_of in ("", scope) and configurable not in NOT_STAGE_SETTINGS:
            kept[selector] = text
    used = set()
    while True:  # the macros the kept bindings use, and the macros those use
        wanted = {m for text in kept.values() for m in re.findall(r"%([\w.]+)", text)} - used
        if not wanted:
            break
        used |= wanted
        kept.update({m: bindings[m] for m in wanted if m in bindings})
    return sorted(kept.values())


def _bindings(config: str) -> dict[str, str]:
    """Selector -> its binding as one line, from gin's config string (a value may span several lines)."""
    out: dict[str, str] = {}
    selector = None
    for line in config.splitlines():
        if not line.strip() or line.startswith("#"):
            selector = None
        elif not line[0].isspace() and " = " in line:
            selector = line.split(" = ", 1)[0].strip()
            out[selector] = line.rstrip(" \\").strip()
        elif selector is not None:
            out[selector] += " " + line.strip().rstrip(" \\")
    return out


OPTIONAL_FIELDS = ("reference", "teacher", "quantize")
"""Stage fields newer than the first experiments: left out of a stage's configuration when unset, so that the
stages that ran before they existed stay valid."""


def stage_config(stage: strategies.Stage, seed: int, done: dict[str, dict]) -> dict:
    """What a stage's result depends on: its definition, seed, the gin lines it trains under, and the
    configurations of the stages it reads (`done`: their records): its initial stage's, and its reference's (online
    DoReMi) or teacher's (distillation) where it has one."""
    definition = {k: v for k, v in asdict(stage).items() if k not in OPTIONAL_FIELDS or v}
    config = {"stage": definition, "seed": seed, "gin": _gin_lines(stage.scope, stage.train_on),
              "init": done[stage.init]["config"] if stage.init else None}
    for role in ("reference", "teacher"):
        if getattr(stage, role):
            config[role] = done[getattr(stage, role)]["config"]
    return json.loads(json.dumps(config))  # as stage.json will hold it (tuples become lists), to compare


def _fingerprint(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_unchanged(name: str, path: Path, config: dict) -> dict | None:
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved["fingerprint"] == _fingerprint(config):
        return saved
    if not saved.get("finished") and not checkpoints.all_steps(path.parent):
        return None  # it stopped before its first checkpoint (a bad setting, say): nothing to keep, start it again
    old, new = saved["config"], config
    what = next((f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in ("stage", "seed", "init")
                 if old.get(key) != new.get(key)), None)
    if what is None:
        changed = sorted(set(old["gin"]) ^ set(new["gin"]))
        what = f"gin binding {changed[0]!r}" if changed else "its configuration"
    raise StageChanged(f"stage {name} in {path.parent} already ran with another configuration ({what}); delete "
                       f"that directory to rerun it, or use another EXPERIMENT_DIR")


def run_stage(root: Path, stage: strategies.Stage, seed: int, done: dict[str, dict], eval_num_examples: int | None,
              evals_per_stage: int, decode: bool = True, decode_intermediate: bool = True,
              measure_models: bool = False) -> dict:
    """Train and evaluate one stage (or skip it when finished); return its stage.json record. `decode=False`
    evaluates the teacher-forced figures alone (`evaluate.evaluate_tasks`); `decode_intermediate=False` does so at
    every evaluation but the last; `measure_models`: the record's `model` (`measure_model`)."""
    stage_dir = stage_directory(root, stage.name, seed)
    init = done[stage.init] if stage.init else None
    config = stage_config(stage, seed, done)
    record_path = stage_dir / RECORD
    saved = _check_unchanged(stage.name, record_path, config)
    if saved and saved.get("finished"):
        print(f"experiment: stage {stage.name} (seed {seed}) already finished; skipped", file=sys.stderr)
        if measure_models and "model" not in saved:  # measuring was turned on, or its figures were dropped to redo
            saved["model"] = measure_model(stage, checkpoints.checkpoint_dir(_weights(stage, stage_dir, init),
                                                                             saved["end_step"]))
            write_json(record_path, saved)
        return saved
    start = init["end_step"] if init else 0
    record = {"name": stage.name, "seed": seed, "config": config, "fingerprint": _fingerprint(config),
              "model_dir": str(stage_dir), "start_step": start, "end_step": start + stage.steps, "finished": False}
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_json(record_path, record)
    print(f"experiment: stage {stage.name} (seed {seed}): {stage.train_on}, steps {start} -> {record['end_step']}"
          + (f", from {stage.init}" if stage.init else ""), file=sys.stderr)
    began = time.monotonic()
    steps = eval_steps(start, stage.steps, evals_per_stage)
    if stage.steps:
        _train_stage(stage, stage_dir, record["end_step"], steps, seed, done)
    trained = time.monotonic()
    weights = _weights(stage, stage_dir, init)
    record["evaluations"] = evaluate_stage(stage, stage_dir, steps, eval_num_examples, decode, decode_intermediate,
                                           weights)
    if measure_models:
        record["model"] = measure_model(stage, checkpoints.checkpoint_dir(weights, steps[-1]))
    # Wall time of the run that finished the stage (a stage resumed after a kill counts its last run only).
    record["seconds"] = {"train": round(trained - began, 1), "eval": round(time.monotonic() - trained, 1)}
    record["finished"] = True
    write_json(record_path, record)
    return record


def _weights(stage: strategies.Stage, stage_dir: Path, init: dict | None) -> Path:
    """Where the checkpoints a stage evaluates are: its own directory, or its init's for an evaluation-only stage."""
    return Path(init["model_dir"]) if not stage.steps else stage_dir


def _train_stage(stage: strategies.Stage, stage_dir: Path, end_step: int, checkpoint_steps: list[int], seed: int,
                 done: dict[str, dict]) -> None:
    """`mtp train` (or finetune, or distill) of one stage under its gin scope."""
    init = done[stage.init] if stage.init else None
    if stage.reference:
        strategies.with_reference(stage, done[stage.reference]["model_dir"])
    with gin.config_scope(stage.scope):
        distillation = distill.DistillConfig(teacher=done[stage.teacher]["model_dir"]) if stage.teacher else None
        train_lib.train(model_dir=str(stage_dir), mixture_or_task_name=stage.train_on, train_steps=end_step,
                        initial_checkpoint_path=init["model_dir"] if init else None, finetune=init is not None,
                        seed=seed, keep_checkpoints=None, checkpoint_every=end_step, checkpoint_steps=checkpoint_steps,
                        distillation=distillation)


def measure_model(stage: strategies.Stage, checkpoint: Path) -> dict:
    """The stage's model as it is evaluated (in int8 where the stage says): parameters, bytes of its weights, and
    greedy decoding's tokens per second on its first task's validation inputs (`evaluate.decoding_speed`)."""
    model, _, _, device = evaluate.model_from(str(checkpoint), None)
    parameters = model.num_params()
    if stage.quantize:
        model, device = quantize.int8(model.cpu()), torch.device("cpu")
    return {"parameters": parameters, "bytes": quantize.state_bytes(model), "quantize": stage.quantize,
            "decode_tokens_per_second": evaluate.decoding_speed(model, stage.evaluate[0], device=device)}


def eval_steps(start: int, steps: int, evals: int) -> list[int]:
    """The `evals` steps, evenly over a stage's own span (start, start + steps], at which it is evaluated; the last
    is its end. Counted from the stage's start, so that a stage that continues another's step count (fine-tuning)
    is evaluated as often as one that starts at 0. An evaluation-only stage (no steps): its start."""
    if steps == 0:
        return [start]
    if not isinstance(evals, int) or not 1 <= evals <= steps:
        raise ValueError(f"experiment.evals_per_stage = {evals!r}: must be an integer from 1 to the steps of the "
                         f"shortest stage ({steps})")
    return [start + k * steps // evals for k in range(1, evals + 1)]


def evaluate_stage(stage: strategies.Stage, stage_dir: Path, steps: list[int],
                   eval_num_examples: int | None, decode: bool = True,
                   decode_intermediate: bool = True, weights: Path | None = None) -> dict[str, dict[str, dict]]:
    """{step: {task: metrics}} at each of `steps` (checkpoints written for them in `weights`, the stage's own
    directory unless it only evaluates another's; one written when a run was stopped in between is not evaluated),
    by `mtp eval`'s own function and settings (in int8 where the stage says). Each result is written as it comes
    (`eval/<step>_<task>/metrics.json` and its bootstrap replicates), so an interrupted evaluation resumes."""
    results: dict[str, dict[str, dict]] = {}
    for step in steps:
        for task in stage.evaluate:
            out = checkpoints.stage_eval_dir(stage_dir, step, task)
            if not (out / checkpoints.EVAL_METRICS).is_file():
                evaluate.evaluate_checkpoint(checkpoint_path=str(checkpoints.checkpoint_dir(weights or stage_dir,
                                                                                              step)),
                                             mixture_or_task_name=task, output_dir=str(out),
                                             num_examples=eval_num_examples,
                                             decode=decode and (decode_intermediate or step == steps[-1]),
                                             quantize=stage.quantize)
            metrics = json.loads((out / checkpoints.EVAL_METRICS).read_text())["metrics"]
            results.setdefault(str(step), {})[task] = metrics.get(task, {})
    return results


@gin.configurable(denylist=["only"])
def experiment(
    experiment_dir: str = gin.REQUIRED,
    arms: Sequence[strategies.Arm] = gin.REQUIRED,
    seeds: Sequence[int] = (0,),
    eval_num_examples: int | None = None,
    evals_per_stage: int = 2,
    decode_intermediate: bool = True,
    title: str = "Experiment",
    parallel: int = 1,
    measure_models: bool = False,
    only: dict | None = None,
) -> Path:
    """Run every stage of every arm for every seed (each shared stage once), write the report; return the
    experiment directory. `decode_intermediate=False`: the evaluations before a stage's last are teacher-forced
    only (target NLL and label figures, no decoding: a learning curve at a fraction of the cost). `parallel` > 1:
    that many stages at a time, each in its own process with a sequential run's threads, the processes sharing the
    cores (`parallel_stages`), with the weights and figures of a sequential run. `measure_models`: each stage's
    parameters, size and decoding speed after its evaluation (stage.json `model`; the report's model table), timed
    on whatever else the machine runs (best of three). `only` (not a gin setting): the one stage a stage process
    runs, {"stage": name, "seed": seed, "definition": the stage as the parent built it}."""
    validation.path_setting("EXPERIMENT_DIR (experiment.experiment_dir)", experiment_dir)
    validation.positive_int("experiment.eval_num_examples", eval_num_examples, allow_none=True)
    validation.positive_int("experiment.evals_per_stage", evals_per_stage)
    validation.positive_int("experiment.parallel", parallel)
    for seed in seeds:
        validation.whole_number("experiment.seeds[]", seed, 0, 2 ** 31 - 1)
    root = Path(experiment_dir)
    arms = list(arms)
    _check_arms(arms)
    for stage in (stage for arm in arms for stage in arm.stages):  # before anything trains
        eval_steps(0, stage.steps, evals_per_stage)
    stages = {stage.name: stage for arm in arms for stage in arm.stages}

    def run(name: str, seed: int, done: dict[str, dict]) -> dict:
        return run_stage(root, stages[name], seed, done, eval_num_examples, evals_per_stage,
                         decode_intermediate=decode_intermediate, measure_models=measure_models)

    if only is not None:
        name, seed = only["stage"], only["seed"]
        if name not in stages or _definition(stages[name]) != only["definition"]:
            raise ValueError(f"stage {name}: this stage process built it as {_definition(stages.get(name))}, the "
                             f"experiment as {only['definition']}; the gin configuration did not parse alike")
        run(name, seed, _finished_records(root, stages[name], seed))
        return root
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "experiment.json", {"title": title, "seeds": list(seeds),
                                           "eval_num_examples": eval_num_examples,
                                           "arms": [asdict(arm) for arm in arms]})
    tasks = sorted({task for arm in arms for stage in arm.stages for task in stage.evaluate})
    if parallel == 1:
        write_baselines(root, tasks, eval_num_examples)
        with evaluate.reusing_evaluators():  # every stage evaluates the same tasks' examples
            for seed in seeds:
                done: dict[str, dict] = {}
                for name in stages:
                    done[name] = run(name, seed, done)
    else:  # the baselines while the first stage processes load
        _run_in_parallel(root, stages, seeds, parallel, measure_models,
                         meanwhile=lambda: write_baselines(root, tasks, eval_num_examples))
    report.build(root)
    return root


def _run_in_parallel(root: Path, stages: dict[str, strategies.Stage], seeds: Sequence[int], parallel: int,
                     measure_models: bool, meanwhile: Callable[[], None]) -> None:
    """Every stage of every seed through `parallel_stages`; a finished stage is checked (unchanged) and skipped
    (unless its model is yet to be measured). `meanwhile()` runs here once the first stages are handed out."""
    from mtplatform import parallel_stages, tf_setup

    def finished(job: parallel_stages.Job) -> bool:
        stage = stages[job.stage]
        done = _finished_records(root, stage, job.seed)
        config = stage_config(stage, job.seed, done)
        saved = _check_unchanged(stage.name, job.stage_dir / RECORD, config)
        if saved and saved.get("finished") and not (measure_models and "model" not in saved):
            print(f"experiment: stage {stage.name} (seed {job.seed}) already finished; skipped", file=sys.stderr)
            return True
        return False

    jobs = [parallel_stages.Job(name, seed, stage.depends_on(),
                                stage_directory(root, name, seed), _definition(stage))
            for seed in seeds for name, stage in stages.items()]
    parallel_stages.run(jobs, parallel, finished, catalog.user_modules, verbose=tf_setup.verbose_logs,
                        meanwhile=meanwhile)


def _definition(stage: strategies.Stage | None) -> dict | None:
    """A stage as JSON holds it (tuples become lists), to compare across processes."""
    return json.loads(json.dumps(asdict(stage))) if stage is not None else None


def _finished_records(root: Path, stage: strategies.Stage, seed: int) -> dict[str, dict]:
    """The stage.json records of the stages `stage` starts from (`init`, `reference`), which have finished."""
    return {name: json.loads((stage_directory(root, name, seed) / RECORD).read_text())
            for name in stage.depends_on()}


def write_json(path: Path, record: dict) -> None:
    """An experiment's JSON file, whole or not at all (`checkpoints.replace_text`)."""
    checkpoints.replace_text(path, json.dumps(record, indent=2) + "\n")


def write_baselines(root: Path, tasks: Sequence[str], num_examples: int | None) -> None:
    """baselines.json: each task's majority-class (or most frequent target) prediction and its metrics on the
    validation examples the arms are scored on, computed once per experiment directory and evaluation size."""
    path = root / "baselines.json"
    baselines = json.loads(path.read_text()) if path.is_file() else {}
    for task in tasks:
        known = baselines.get(task, {})
        if known.get("num_examples", "unset") != num_examples or (
                task in catalog.LABELS and "label_accuracy" not in known["metrics"]):  # from before label figures
            prediction, metrics = evaluate.constant_baseline(task, num_examples=num_examples)
            baselines[task] = {"prediction": prediction, "metrics": metrics, "num_examples": num_examples}
    write_json(path, baselines)


def _check_arms(arms: Sequence[strategies.Arm]) -> None:
    """Stage names identify stages: the same name must mean the same stage, and an init must come first."""
    seen: dict[str, strategies.Stage] = {}
    for arm in arms:
        for stage in arm.stages:
            if stage.name in seen and seen[stage.name] != stage:
                raise ValueError(f"arm {arm.name!r}: stage {stage.name} is defined twice, differently")
            if stage.init and stage.init not in seen:
                raise ValueError(f"arm {arm.name!r}: stage {stage.name} starts from {stage.init}, which no earlier "
                                 "stage of the experiment defines")
            if stage.teacher and stage.teacher not in seen:
                raise ValueError(f"arm {arm.name!r}: stage {stage.name}'s teacher is stage {stage.teacher}, which no "
                                 "earlier stage of the experiment defines")
            if stage.steps == 0 and not stage.init:
                raise ValueError(f"arm {arm.name!r}: stage {stage.name} trains no steps and starts from no stage: "
                                 "there is nothing to evaluate")
            if stage.reference and stage.reference not in seen:
                raise ValueError(f"arm {arm.name!r}: stage {stage.name}'s reference model is stage {stage.reference}, "
                                 "which no earlier stage of the experiment defines")
            seen[stage.name] = stage
