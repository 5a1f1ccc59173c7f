"""Experiments: stages shared by arms run once, interrupted experiments continue, changed stages are refused, and
the report (tables, baselines, plots) comes only from evaluations that ran."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import gin
import pytest
import torch
from conftest import REPO, mtp, mtp_here

import tasks  # noqa: F401  (registers the tasks the strategies name)
from mtplatform import checkpoints, report, strategies

SMOKE = ("--gin_file=gin/experiments/demo.gin", "--gin_file=gin/models/tiny.gin",
         "--gin.pretrain_then_finetune.pretrain_steps=6", "--gin.pretrain_then_finetune.finetune_steps=4",
         "--gin.pretrain_then_finetune.tasks=['glue_rte', 'glue_stsb']", "--gin.experiment.eval_num_examples=16",
         "--gin.BATCH_SIZE=4", "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}", "--gin.train.log_every=2",
         "--gin.evaluate_checkpoint.max_decode_length=8")


def _in_process(capfd, *args: str) -> tuple[int, str]:
    """`mtp ...` in this process (the command's own code, without another TensorFlow start): (exit code, stderr)."""
    code = mtp_here(*args)
    return code, capfd.readouterr().err


@pytest.mark.slow  # the default suite's 15-minute budget (19.5 min on an AVX2 CPU without it)
def test_smoke_experiment_end_to_end_resumes_and_refuses_changes(tmp_path, vocab_file, capfd):
    exp = tmp_path / "exp"
    out = mtp("experiment", *SMOKE, f"--gin.EXPERIMENT_DIR='{exp}'")
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((exp / "results.json").read_text())
    assert [a["name"] for a in results["arms"]] == ["pre-train on span_corruption_and_glue + fine-tune",
                                                    "from scratch, same total steps"]
    assert results["tasks"] == ["glue_rte", "glue_stsb"]
    # The shared pre-training ran once, and fine-tuning continued its step count (t5x counting).
    assert out.stderr.count("stage pretrain (seed 0)") == 1
    assert checkpoints.all_steps(exp / "pretrained_ft_glue_rte" / "seed_0")[-1] == 10
    # Each stage was evaluated exactly evals_per_stage (2) times, evenly over its own span: the fine-tuning stage,
    # which continues pre-training's step count (6 -> 10), as often as the stage that starts at 0.
    for stage, steps in {"pretrained_ft_glue_rte": ["8", "10"], "scratch_glue_stsb": ["5", "10"]}.items():
        assert list(json.loads((exp / stage / "seed_0" / "stage.json").read_text())["evaluations"]) == steps
    assert checkpoints.all_steps(exp / "pretrain" / "seed_0") == [3, 6]
    # Every figure is the last checkpoint's, names the evaluation it came from, and that evaluation exists on disk
    # with its bootstrap replicates; every figure has an interval, and the arm that is not best a p-value.
    for arm in results["arms"]:
        for task, entry in arm["tasks"].items():
            assert entry["n"] == 1
            last = entry["seeds"][0]["last"]
            assert last["step"] == 10 and Path(last["checkpoint"]).is_dir()
            evaluation = Path(last["checkpoint"]).parent / "eval" / f"10_{task}"
            assert json.loads((evaluation / "metrics.json").read_text())["metrics"][task] == last["metrics"]
            assert last["figures"]["score"] == pytest.approx(report.score(last["metrics"]))
            assert (evaluation / "bootstrap.npz").is_file()
            fine_tuned = entry["seeds"][0]["stage"].startswith("pretrained_ft")
            assert [c["step"] for c in entry["seeds"][0]["curve"]] == ([8, 10] if fine_tuned else [5, 10])
            names = {"score", "target_nll"} | ({"label_accuracy", "gold_label_logprob"} if task == "glue_rte"
                                               else set())
            assert set(entry["figures"]) == names
            for figure in entry["figures"].values():
                low, high = figure["ci95"]
                # (A percentile interval of a skewed statistic on 16 examples need not hold its point estimate.)
                assert low <= high and low - (high - low) - 1e-9 <= figure["mean"] <= high + (high - low) + 1e-9
                assert figure["best"] or 0.0 <= figure["p_value"] <= 1.0
            assert 0 < last["metrics"]["target_nll"] < 20
    assert results["baselines"]["glue_rte"]["prediction"] == "entailment"
    # The baseline is scored on the arms' examples: RTE's first 16 validation pairs, 10 of them entailment.
    assert results["baselines"]["glue_rte"]["metrics"]["accuracy"] == pytest.approx(100 * 10 / 16)
    table = (exp / "results.md").read_text()
    assert "| majority class / constant prediction | - | 62.50 |" in table and "GLUE avg" in table
    assert "## Target NLL" in table and "## Label accuracy" in table and "95% bootstrap interval" in table
    # Whether pre-training paid: every figure of the pre-trained arm against from scratch, with a paired test.
    assert "## Against *from scratch, same total steps*" in table
    against = results["against_reference"]
    assert {(r["task"], r["figure"]) for r in against} == {
        ("glue_rte", "score"), ("glue_rte", "target_nll"), ("glue_rte", "label_accuracy"), ("glue_stsb", "score"),
        ("glue_stsb", "target_nll")}
    assert all(0 <= r["p_value"] <= 1 and r["ci95"][0] <= r["ci95"][1] for r in against)
    assert "scored on the same first 16 validation examples" in table
    assert "configured share of examples -> share trained on" in table
    # Where the time went: every stage timed its training and its evaluation.
    seconds = results["seconds"]
    assert seconds["stages"] == seconds["of_stages"] == 5 and seconds["train"] > 0 and seconds["eval"] > 0
    assert f"Wall time in 5 of 5 stages: training {seconds['train']:,.0f} s" in table
    for plot in ("scores.png", "target_nll.png", "loss.png", "task_losses.png", "shares.png"):
        assert (exp / plot).stat().st_size > 5000
    # `mtp report` rebuilds the same tables from what the runs wrote.
    (exp / "results.md").unlink()
    code, err = _in_process(capfd, "report", str(exp))
    assert code == 0, err[-3000:]
    assert (exp / "results.md").read_text() == table

    # Interrupted: the last stage lost its final checkpoint and its record says unfinished. Re-running skips
    # every finished stage and resumes that one from its checkpoint.
    stage_dir = exp / "scratch_glue_stsb" / "seed_0"
    record = json.loads((stage_dir / "stage.json").read_text())
    (stage_dir / "stage.json").write_text(json.dumps({**record, "finished": False}))
    shutil.rmtree(stage_dir / "checkpoint_10")
    shutil.rmtree(stage_dir / "eval")
    code, err = _in_process(capfd, "experiment", *SMOKE, f"--gin.EXPERIMENT_DIR='{exp}'")
    assert code == 0, err[-3000:]
    assert err.count("already finished; skipped") == 4
    assert f"resuming from {stage_dir / 'checkpoint_5'}" in err
    assert json.loads((exp / "results.json").read_text())["arms"] == results["arms"]  # exact resume: same figures

    # A finished stage with a changed configuration is refused, by name.
    code, err = _in_process(capfd, "experiment", *SMOKE, f"--gin.EXPERIMENT_DIR='{exp}'",
                            "--gin.pretrain/learning_rate.base=0.1")
    assert code == 2
    assert "stage pretrain in" in err and "pretrain/learning_rate.base" in err and err.count("\n") == 1


def _without_paths_and_times(value, *dirs: Path):
    """results.json's figures, with the experiment directory's path and the wall times taken out."""
    if isinstance(value, dict):
        return {k: _without_paths_and_times(v, *dirs) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_without_paths_and_times(v, *dirs) for v in value]
    if isinstance(value, str):
        for d in dirs:
            value = value.replace(str(d), "EXPERIMENT_DIR")
    return value


@pytest.mark.slow  # four experiments of five stages, each stage process loading TensorFlow: about five minutes
def test_parallel_stages_match_a_sequential_run_through_a_signal_and_a_failure(tmp_path, vocab_file):
    import signal
    import subprocess
    import sys
    import time

    sequential, parallel = tmp_path / "sequential", tmp_path / "parallel"
    # On the machine's threads, as each of the two stage processes (their threads share the cores).
    out = mtp("experiment", *SMOKE, f"--gin.EXPERIMENT_DIR='{sequential}'")
    assert out.returncode == 0, out.stderr[-3000:]
    args = [*SMOKE, f"--gin.EXPERIMENT_DIR='{parallel}'", "--gin.PARALLEL=2"]
    # SIGTERM once a stage process trains: the parent passes it on, each running stage checkpoints, one line.
    process = subprocess.Popen([sys.executable, "-m", "mtplatform.cli", "experiment", *args], cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while not list(parallel.glob("*/seed_0/metrics.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert err.strip().splitlines()[-1] == ("mtp: experiment stopped by SIGTERM: each running stage wrote a "
                                            "checkpoint; rerun to continue")
    assert err.count("started in process") == 2 and f", {torch.get_num_threads()} thread(s)" in err
    # A stage that fails (here: a bad fine-tuning setting) is one line naming it and its log; the others finish.
    out = mtp("experiment", *args, "--gin.finetune/train.dropout_rate=2.0")
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    # Both fine-tuning stages start side by side and fail at once: the line names whichever ended first.
    failed = re.match(r"mtp: error: stage (pretrained_ft_glue_(?:rte|stsb)) \(seed 0\) failed with exit code 2: "
                      r"mtp: error: ", last)
    assert failed, last
    log = parallel / failed.group(1) / "seed_0" / "log.txt"
    assert "train.dropout_rate" in last and last.endswith(f"(log: {log})")
    # Rerun: every stage finished, resumed or run, with a sequential run's weights and figures.
    out = mtp("experiment", *args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "0 waiting]" in out.stderr
    weights = sorted(p.relative_to(sequential) for p in sequential.glob("*/seed_0/checkpoint_*/model.safetensors"))
    assert len(weights) == 10
    for path in weights:
        assert (parallel / path).read_bytes() == (sequential / path).read_bytes(), path
    results = [json.loads((d / "results.json").read_text()) for d in (sequential, parallel)]
    assert _without_paths_and_times(results[0]["arms"], sequential) == _without_paths_and_times(
        results[1]["arms"], parallel)


def test_training_and_mixing_strategies_make_the_papers_arms():
    gin.clear_config()
    try:
        arms = strategies.training_strategies(tasks=["glue_rte", "glue_mrpc"], budget=2**-15)
        assert [a.name for a in arms] == [
            "unsupervised pre-training + fine-tuning", "multi-task training", "multi-task pre-training + fine-tuning",
            "leave-one-out multi-task training + fine-tuning", "supervised multi-task pre-training + fine-tuning",
            "no pre-training (each task from scratch)"]
        by_name = {a.name: a for a in arms}
        assert strategies.steps_for(2**-15) == (16, 8)  # 2**19 and 2**18 scaled
        multitask = by_name["multi-task training"].stages
        assert len(multitask) == 1 and multitask[0].steps == 24 and set(multitask[0].evaluate) == {"glue_rte",
                                                                                                  "glue_mrpc"}
        loo = by_name["leave-one-out multi-task training + fine-tuning"].stages
        import seqio

        left_out = {t.name for t in seqio.get_mixture_or_task(loo[0].train_on).tasks}
        assert loo[0].name == "leave_one_out_glue_rte" and left_out == {"glue_mrpc", "span_corruption"}
        assert loo[1].init == loo[0].name and loo[1].evaluate == ("glue_rte",)
        scratch = by_name["no pre-training (each task from scratch)"].stages
        assert all(s.init is None and s.steps == 24 for s in scratch)

        sweep = strategies.mixing_strategies(tasks=["glue_rte", "glue_mrpc"], budget=2**-15)
        assert [a.name for a in sweep] == ["equal", "proportional K=2^12", "proportional K=2^14",
                                           "proportional K=2^16", "proportional K=2^18", "temperature T=2",
                                           "temperature T=4", "temperature T=8", "UniMax N=1"]
        t2 = seqio.get_mixture_or_task(sweep[5].stages[0].train_on)
        from mtplatform import mixing

        rates = mixing.resolve(t2).rates
        assert rates["glue_rte"] == pytest.approx(math.sqrt(2490))
    finally:
        gin.clear_config()


@pytest.mark.parametrize("name,arms", [("training_strategies", 6), ("mixing_strategies", 12),
                                       ("mixture_search_validation", 6), ("online_mixing", 3)])
def test_shipped_experiment_files_make_their_arms_on_our_data(name, arms, data_dir):
    from mtplatform import cli, mixing

    gin.clear_config()
    try:
        cli.parse_gin([f"gin/experiments/{name}.gin", "gin/models/tiny.gin"],
                      ["--gin.EXPERIMENT_DIR='/nowhere'", "--gin.BUDGET=0.0005"], [])
        made = getattr(strategies, "mixing_strategies" if name.startswith("mixture") else name)()
        assert len(made) == arms
        stages = [stage for arm in made for stage in arm.stages]
        assert {t for s in stages for t in s.evaluate} == {"glue_cola", "glue_sst2", "glue_mrpc", "glue_stsb",
                                                          "glue_rte", "squad_v1_devsplit", "conll2003_ner"}
        import seqio

        for stage in stages:  # every mixture trains on data that is here, nothing dropped
            assert not mixing.resolve(seqio.get_mixture_or_task(stage.train_on), budget_examples=1e5).dropped
        assert max(s.steps for s in stages) == 262 + 131  # BUDGET 0.0005 of 2**19 + 2**18
        by_name = {arm.name: arm.stages[0] for arm in made}
        if name == "mixing_strategies":  # online DoReMi's reference: the K = 2^14 arm's model, seed by seed
            doremi = by_name["online DoReMi (from K=2^14)"]
            assert doremi.reference == by_name["proportional K=2^14"].name
            online = seqio.get_mixture_or_task(doremi.train_on).declared["online"]
            assert online["reference"] == strategies.reference_placeholder(doremi.reference)
    finally:
        gin.clear_config()


def _objectives_config(*bindings: str) -> None:
    from mtplatform import cli

    gin.clear_config()
    cli.parse_gin(["gin/experiments/objectives.gin"],
                  ["--gin.EXPERIMENT_DIR='/nowhere'", "--gin.BUDGET=0.0005", *bindings], [])


def test_objectives_experiment_and_what_a_stage_depends_on(data_dir):
    """One pre-training per objective, fine-tuned on each task, beside from scratch; a stage's configuration holds
    the bindings it trains under and the macros those use, not the experiment's list of arms."""
    from mtplatform import experiment

    try:
        _objectives_config()
        arms = strategies.pretraining_objectives()
        assert [a.name for a in arms][:3] == ["prefix_lm", "bert_mlm", "deshuffling"] and len(arms) == 14
        assert [s.name for s in arms[1].stages] == ["pretrain_bert_mlm", "bert_mlm_ft_glue_sst2",
                                                    "bert_mlm_ft_glue_mrpc"]
        assert arms[1].stages[0].train_on == "bert_mlm" and arms[1].stages[1].init == "pretrain_bert_mlm"
        assert arms[-1].stages[0].steps == 262 + 131
        before = {scope: experiment._gin_lines(scope, "bert_mlm") for scope in ("pretrain", "finetune")}
        assert "pretrain/train.task_feature_lengths = {'inputs': 128, 'targets': 128}" in before["pretrain"]
        assert "TASK_FEATURE_LENGTHS = {'inputs': 128, 'targets': 32}" in before["finetune"]  # a macro it uses
        _objectives_config("--gin.OBJECTIVES=['bert_mlm', 'nsp']", "--gin.TASKS=['glue_rte']")
        assert {scope: experiment._gin_lines(scope, "bert_mlm") for scope in ("pretrain", "finetune")} == before
        _objectives_config("--gin.pretrain/objectives.span_corruption.noise_density=0.5")
        after = {scope: experiment._gin_lines(scope, "bert_mlm") for scope in ("pretrain", "finetune")}
        assert after["finetune"] == before["finetune"]
        assert set(after["pretrain"]) - set(before["pretrain"]) == {
            "pretrain/span_corruption.noise_density = 0.5"}
        # A mixture declared in gin (a search's proposal.gin) and a search's settings are part only of the stages
        # that train on that mixture.
        declared = "mixtures.declared = {'rte_and_mrpc': {'tasks': ['glue_rte', 'glue_mrpc']}}"
        _objectives_config(f"--gin.{declared.replace(' = ', '=', 1)}", "--gin.mixture_search.num_runs=9")
        assert experiment._gin_lines("pretrain", "bert_mlm") == before["pretrain"]
        assert set(experiment._gin_lines("pretrain", "rte_and_mrpc")) - set(before["pretrain"]) == {declared}
    finally:
        gin.clear_config()


def test_multitask_training_alone_is_an_arm():
    # finetune_steps = 0 (multi-task training without fine-tuning) used to crash `mtp experiment`.
    arms = strategies.pretrain_then_finetune(mixture="span_corruption_and_glue", tasks=["glue_rte"],
                                             pretrain_steps=10, finetune_steps=0)
    assert arms[0].stages == (strategies.Stage("pretrain", "span_corruption_and_glue", 10, evaluate=("glue_rte",)),)
    assert arms[1].stages[0].steps == 10 and arms[1].stages[0].init is None


def test_report_scores_follow_t5():
    assert report.score({"f1": 80.0, "accuracy": 70.0}) == 75.0  # MRPC: F1 and accuracy averaged
    assert report.score({"ner_precision": 10.0, "ner_recall": 20.0, "ner_f1": 13.0}) == 13.0
    assert report.score({"pearson_corrcoef": float("nan"), "spearman_corrcoef": float("nan")}) == 0.0


def test_low_resource_subsets_are_fixed_and_its_arms_ration_only_the_task(data_dir):
    """A capped task trains on the same examples however often it is registered (every arm, run and seed), keeps
    the task's validation split, metrics and labels; the experiment file makes its arms."""
    import seqio

    from mtplatform import catalog, cli
    from tasks import subsets

    name = subsets.register_subset("glue_sst2", 256)
    task = seqio.get_mixture_or_task(name)
    first = [ex["sentence"] for ex in task.source.get_dataset("train").as_numpy_iterator()]
    subsets.register_subset("glue_sst2", 256)
    again = [ex["sentence"] for ex in seqio.get_mixture_or_task(name).source.get_dataset("train").as_numpy_iterator()]
    full = seqio.get_mixture_or_task("glue_sst2")
    everything = [ex["sentence"] for ex in full.source.get_dataset("train").as_numpy_iterator()]
    assert len(first) == 256 and first == again and len(set(first)) == 256
    assert set(first) <= set(everything) and first != everything[:256]  # drawn from the whole file, not its head
    assert task.num_input_examples("train") == 256
    assert task.num_input_examples("validation") == full.num_input_examples("validation")
    assert catalog.LABELS[name] == catalog.LABELS["glue_sst2"] and task.metric_fns == full.metric_fns
    with pytest.raises(ValueError, match="span_corruption: only a task read from files"):
        subsets.register_subset("span_corruption", 256)
    with pytest.raises(ValueError, match="positive integer size, got 0"):
        subsets.register_subset("glue_sst2", 0)

    gin.clear_config()
    try:
        cli.parse_gin(["gin/experiments/low_resource.gin"],
                      ["--gin.EXPERIMENT_DIR='/nowhere'"], [])
        arms = strategies.low_resource()
        assert [a.name for a in arms] == ["pre-trained on span_corruption", "pre-trained multi-task", "from scratch"]
        columns = [s.train_on for s in arms[2].stages]
        assert columns == ["glue_sst2_train256", "glue_sst2_train1024", "glue_sst2_train4096", "glue_sst2",
                           "glue_mrpc_train256", "glue_mrpc_train1024", "glue_mrpc_train4096", "glue_mrpc"]
        multitask = {t.name for t in seqio.get_mixture_or_task(arms[1].stages[0].train_on).tasks}
        assert not multitask & {"glue_sst2", "glue_mrpc"} and "span_corruption" in multitask
        assert arms[0].notes["train_examples"]["glue_mrpc"] == {"task": "glue_mrpc", "examples": 3668, "all": True}
        with pytest.raises(ValueError, match="multitask_tasks holds \\['glue_sst2'\\]"):
            strategies.low_resource(multitask_tasks=["glue_sst2"])
    finally:
        gin.clear_config()


@pytest.mark.slow  # five stages, each evaluated and timed: about 1.5 minutes idle, 3 beside other work
def test_compression_experiment_distills_quantizes_and_measures_each_model(tmp_path, vocab_file, capfd):
    """gin/experiments/compression.gin at a tiny size: the teacher, its int8 evaluation (no training: the teacher's
    checkpoint), a student from scratch, the distilled student (the teacher its dependency) and the shared and
    factorized model; the report's model table from measurements that ran; a rerun finds every stage finished."""
    exp = tmp_path / "compression"
    args = ("experiment", "--gin_file=gin/experiments/compression.gin", "--gin_file=gin/models/tiny.gin",
            f"--gin.EXPERIMENT_DIR='{exp}'", "--gin.TASKS=['glue_rte']", "--gin.TEACHER_STEPS=6",
            "--gin.STUDENT_STEPS=4", "--gin.BATCH_SIZE=4", "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 8}",
            "--gin.experiment.eval_num_examples=16", "--gin.evaluate_checkpoint.max_decode_length=8",
            "--gin.EMBEDDING_DIM=32", "--gin.train.precision='fp32'", "--gin.train.log_every=2")
    code, err = _in_process(capfd, *args)
    assert code == 0, err[-3000:]
    results = json.loads((exp / "results.json").read_text())
    models = {arm["name"]: arm["model"] for arm in results["arms"]}
    assert list(models) == ["teacher", "teacher in int8", "student from scratch", "distilled student",
                            "shared blocks + factorized embedding"]
    teacher, int8, student = models["teacher"], models["teacher in int8"], models["student from scratch"]
    assert int8["parameters"] == teacher["parameters"] > models["distilled student"]["parameters"] == \
        student["parameters"] > models["shared blocks + factorized embedding"]["parameters"]
    assert int8["quantize"] == "int8" and int8["bytes"] < 0.8 * teacher["bytes"]
    assert all(m["decode_tokens_per_second"] > 0 for m in models.values())
    # The int8 arm trained nothing: it evaluated the teacher's last checkpoint, quantized.
    evaluation = json.loads((exp / "teacher_int8/seed_0/eval/6_glue_rte/metrics.json").read_text())
    assert evaluation["quantize"] == "int8" and evaluation["checkpoint"] == str(exp / "teacher/seed_0/checkpoint_6")
    assert not checkpoints.all_steps(exp / "teacher_int8" / "seed_0")
    distilled = json.loads((exp / "distilled/seed_0/stage.json").read_text())
    assert distilled["config"]["teacher"]["stage"]["name"] == "teacher"
    rows = checkpoints.read_metrics(exp / "distilled" / "seed_0")
    assert {"distill/cross_entropy", "distill/kl"} <= set(rows[-1])
    assert "from every other layer of the teacher" in err
    assert "## Model: parameters, size, decoding speed" in (exp / "results.md").read_text()
    # A rerun finds every stage finished; one whose measurement was dropped (to redo it on an idle machine) is
    # measured again, and nothing trains.
    record = json.loads((exp / "student/seed_0/stage.json").read_text())
    del record["model"]
    (exp / "student/seed_0/stage.json").write_text(json.dumps(record))
    code, err = _in_process(capfd, *args)
    assert code == 0 and err.count("already finished; skipped") == 5, err[-3000:]
    remeasured = json.loads((exp / "student/seed_0/stage.json").read_text())["model"]
    assert remeasured["parameters"] == student["parameters"] and remeasured["decode_tokens_per_second"] > 0
    assert checkpoints.all_steps(exp / "student" / "seed_0") == [4]
