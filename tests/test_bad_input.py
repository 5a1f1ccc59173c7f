"""Bad input of every kind, through the `mtp` command: each case must end with exit code 2 and one line on stderr
that names the culprit (the setting, the file and line, the task), with no traceback. Run in this process (the
command's own `cli.main`, `conftest.mtp_here`) so that forty cases cost seconds, not forty TensorFlow start-ups."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import mtp_here

import tasks  # noqa: F401


def _train_args(model_dir: Path, *overrides: str, command: str = "train") -> list[str]:
    return [command, "--gin_file=gin/models/tiny.gin", "--gin_file=gin/runs/pretrain.gin",
            "--gin.MIXTURE_OR_TASK_NAME='glue_rte'", "--gin.TRAIN_STEPS=1", "--gin.BATCH_SIZE=2",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 8}", "--gin.train.progress=False",
            f"--gin.MODEL_DIR='{model_dir}'", *overrides]


@dataclass
class Case:
    name: str
    args: Callable[[Path], list[str]]  # from the case's own temporary directory
    says: tuple[str, ...]  # what the one-line message must contain
    prepare: Callable[[Path, Path], dict[str, str]] = field(default=lambda tmp, data: {})  # -> environment


def _train(*overrides: str) -> Callable[[Path], list[str]]:
    return lambda tmp: _train_args(tmp / "run", *overrides)


# --- data directories with one broken file (the rest linked to the real data) ---------------------------------------


def _data_with(tmp: Path, data: Path, relative: str, content: bytes) -> dict[str, str]:
    root = tmp / "data"
    for item in data.rglob("*"):
        target = root / item.relative_to(data)
        if item.is_file() and item.relative_to(data).as_posix() != relative:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(item)
    (root / relative).parent.mkdir(parents=True, exist_ok=True)
    (root / relative).write_bytes(content)
    return {"MTP_DATA_DIR": str(root)}


def _rte_train(edit: Callable[[list[bytes]], None]) -> Callable[[Path, Path], dict[str, str]]:
    def prepare(tmp: Path, data: Path) -> dict[str, str]:
        lines = (data / "glue/RTE/train.tsv").read_bytes().splitlines(keepends=True)
        edit(lines)
        return _data_with(tmp, data, "glue/RTE/train.tsv", b"".join(lines))
    return prepare


def _squad(edit: Callable[[dict], None]) -> Callable[[Path, Path], dict[str, str]]:
    def prepare(tmp: Path, data: Path) -> dict[str, str]:
        squad = json.loads((data / "squad/dev-v1.1.json").read_text())
        edit(squad)
        return _data_with(tmp, data, "squad/dev-v1.1.json", json.dumps(squad).encode())
    return prepare


def _set_line(number: int, content: bytes) -> Callable[[list[bytes]], None]:
    def edit(lines: list[bytes]) -> None:
        lines[number - 1] = content
    return edit


def _vocab(content: bytes) -> Callable[[Path, Path], dict[str, str]]:
    def prepare(tmp: Path, data: Path) -> dict[str, str]:
        (tmp / "bad.model").write_bytes(content)
        return {"MTP_VOCAB": str(tmp / "bad.model")}
    return prepare


def _file(name: str, content: str) -> Callable[[Path, Path], dict[str, str]]:
    def prepare(tmp: Path, data: Path) -> dict[str, str]:
        (tmp / name).write_text(content)
        return {"PYTHONPATH_EXTRA": str(tmp)}
    return prepare


def _checkpoint(edit: Callable[[Path], None] | None = None) -> Callable[[Path, Path], dict[str, str]]:
    """A real one-step tiny checkpoint in tmp/run, then `edit` applied to it."""
    def prepare(tmp: Path, data: Path) -> dict[str, str]:
        assert mtp_here(*_train_args(tmp / "run")) == 0
        if edit:
            edit(tmp / "run" / "checkpoint_1")
        return {}
    return prepare


def _corpus(content: bytes) -> Callable[[Path, Path], dict[str, str]]:
    """A data directory whose text corpus is one file of `content` (the other data linked to the real files)."""
    def prepare(tmp: Path, data: Path) -> dict[str, str]:
        root = tmp / "data"
        for item in data.iterdir():
            if item.name != "text":
                root.mkdir(parents=True, exist_ok=True)
                (root / item.name).symlink_to(item)
        (root / "text").mkdir(parents=True)
        (root / "text" / "corpus.txt").write_bytes(content)
        return {"MTP_DATA_DIR": str(root)}
    return prepare


def _text_file(name: str, content: bytes) -> Callable[[Path, Path], dict[str, str]]:
    def prepare(tmp: Path, data: Path) -> dict[str, str]:
        (tmp / name).write_bytes(content)
        return {}
    return prepare


def _eval(*overrides: str, checkpoint: str = "/no/such/run") -> Callable[[Path], list[str]]:
    """`mtp eval` of glue_rte; settings are checked before the checkpoint is read, so most cases need none."""
    return lambda tmp: ["eval", "--gin_file=gin/runs/eval.gin", f"--gin.CHECKPOINT_PATH='{checkpoint}'",
                        "--gin.MIXTURE_OR_TASK_NAME='glue_rte'", *overrides]


def _infer(input_name: str) -> Callable[[Path], list[str]]:
    return lambda tmp: ["infer", "--gin_file=gin/runs/infer.gin", f"--gin.CHECKPOINT_PATH='{tmp / 'run'}'",
                        f"--gin.OUTPUT_FILE='{tmp / 'out.jsonl'}'", f"--gin.INPUT_FILE='{tmp / input_name}'"]


def _experiment(*overrides: str) -> Callable[[Path], list[str]]:
    return lambda tmp: ["experiment", "--gin_file=gin/experiments/training_strategies.gin",
                        f"--gin.EXPERIMENT_DIR='{tmp / 'exp'}'", *overrides]


def _both(*prepares: Callable[[Path, Path], dict[str, str]]) -> Callable[[Path, Path], dict[str, str]]:
    return lambda tmp, data: {k: v for prepare in prepares for k, v in prepare(tmp, data).items()}


def _truncate(name: str) -> Callable[[Path], None]:
    def edit(checkpoint: Path) -> None:
        path = checkpoint / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return edit


def _search(mixture: str, *overrides: str) -> Callable[[Path], list[str]]:
    return lambda tmp: ["mixture", "search", mixture, "--gin_file=gin/experiments/mixture_search.gin",
                        "--gin_file=gin/models/tiny.gin", f"--gin.EXPERIMENT_DIR='{tmp / 'search'}'", *overrides]


CASES = [
    # Step counts, batch sizes, intervals, rates
    Case("train_steps_zero", _train("--gin.TRAIN_STEPS=0"), ("TRAIN_STEPS", "= 0", ">= 1")),
    Case("train_steps_negative", _train("--gin.TRAIN_STEPS=-5"), ("TRAIN_STEPS", "= -5")),
    Case("train_steps_quoted", _train("--gin.TRAIN_STEPS='10'"), ("TRAIN_STEPS", "= '10'")),
    Case("train_steps_word", _train("--gin.TRAIN_STEPS=abc"), ("--gin.TRAIN_STEPS=abc", "Python literals")),
    Case("batch_negative", _train("--gin.BATCH_SIZE=-8"), ("BATCH_SIZE", "= -8")),
    Case("batch_fraction", _train("--gin.BATCH_SIZE=2.5"), ("BATCH_SIZE", "= 2.5")),
    Case("batch_not_multiple", _train("--gin.train.grad_accum_steps=4", "--gin.BATCH_SIZE=6"),
         ("BATCH_SIZE=6", "grad_accum_steps (4)")),
    Case("checkpoint_every_zero", _train("--gin.train.checkpoint_every=0"), ("train.checkpoint_every = 0",)),
    Case("log_every_zero", _train("--gin.train.log_every=0"), ("train.log_every = 0",)),
    Case("grad_accum_zero", _train("--gin.train.grad_accum_steps=0"), ("train.grad_accum_steps = 0",)),
    Case("keep_checkpoints_zero", _train("--gin.train.keep_checkpoints=0"), ("train.keep_checkpoints = 0",)),
    Case("dropout_above_one", _train("--gin.train.dropout_rate=1.5"), ("train.dropout_rate = 1.5",)),
    Case("z_loss_negative", _train("--gin.train.z_loss=-1.0"), ("train.z_loss = -1.0",)),
    Case("clip_negative", _train("--gin.train.clip_grad_norm=-1.0"), ("train.clip_grad_norm = -1.0",)),
    Case("precision_unknown", _train("--gin.train.precision='fp64'"), ("fp64",)),
    Case("optimizer_unknown", _train("--gin.make_optimizer.name='sgdx'"), ("sgdx",)),
    Case("schedule_unknown", _train("--gin.learning_rate.name='bogus'"), ("bogus",)),
    # Feature lengths
    Case("targets_length_zero", _train("--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 0}"),
         ("TASK_FEATURE_LENGTHS['targets'] = 0",)),
    Case("lengths_not_a_dict", _train("--gin.TASK_FEATURE_LENGTHS=64"), ("TASK_FEATURE_LENGTHS = 64",)),
    Case("lengths_without_targets", _train("--gin.TASK_FEATURE_LENGTHS={'inputs': 64}"),
         ("TASK_FEATURE_LENGTHS", "'targets'")),
    Case("lengths_cut_everything", _train("--gin.TASK_FEATURE_LENGTHS={'inputs': 2, 'targets': 2}"),
         ("TASK_FEATURE_LENGTHS['inputs'] = 2", "cuts 100% of task glue_rte")),
    # Names: tasks, mixtures, gin, modules
    Case("task_unknown", _train("--gin.MIXTURE_OR_TASK_NAME='no_such_task'"), ("no_such_task",)),
    Case("task_weight_unknown", _train("--gin.train.task_loss_weights={'glue_sst9': 2.0}"), ("glue_sst9",)),
    Case("mixing_strategy_unknown", _train("--gin.MIXTURE_OR_TASK_NAME='glue'", "--gin.mixing.strategy='bogus'"),
         ("mixture glue", "mixing.strategy='bogus'")),
    Case("gin_parameter_misspelt", _train("--gin.T5Config.d_modle=3"), ("d_modle",)),
    Case("gin_override_without_value", _train("--gin.TRAIN_STEPS"), ("--gin.TRAIN_STEPS", "needs a value")),
    Case("gin_file_missing", lambda tmp: _train_args(tmp / "run", "--gin_file=no/such/file.gin"),
         ("no/such/file.gin",)),
    Case("gin_syntax_error", lambda tmp: _train_args(tmp / "run", f"--gin_file={tmp / 'broken.gin'}"),
         ("broken.gin", "line 2"), _file("broken.gin", "T5Config.d_model = 64\nT5Config.d_ff = = 3\n")),
    Case("module_missing", lambda tmp: ["tasks", "list", "--module=no_such_module_xyz"], ("no_such_module_xyz",)),
    Case("module_raises", lambda tmp: ["tasks", "list", "--module=broken_tasks_module"],
         ("broken_tasks_module", "task registry is down"),
         _file("broken_tasks_module.py", "raise RuntimeError('task registry is down')\n")),
    Case("required_setting_missing", lambda tmp: [a for a in _train_args(tmp / "run") if "TRAIN_STEPS" not in a],
         ("TRAIN_STEPS",)),
    # Files: data, vocabulary, checkpoints, directories
    Case("data_dir_missing", _train("--gin.DATA_DIR='/no/such/data'"), ("/no/such/data",)),
    Case("tsv_not_utf8", _train(), ("glue/RTE/train.tsv:5", "UTF-8"),
         _rte_train(_set_line(5, b"5\tCaf\xe9 au lait.\tA drink.\tentailment\n"))),
    Case("tsv_missing_field", _train(), ("glue/RTE/train.tsv:3", "expected 4 tab-separated fields"),
         _rte_train(_set_line(3, b"3\tonly two\n"))),
    Case("squad_context_missing", _train("--gin.MIXTURE_OR_TASK_NAME='squad_v1_devsplit'",
                                         "--gin.TASK_FEATURE_LENGTHS={'inputs': 256, 'targets': 16}"),
         ("dev-v1.1.json", "data[0].paragraphs[0]", "'context'"),
         _squad(lambda s: s["data"][0]["paragraphs"][0].pop("context"))),
    Case("squad_answer_text_missing", _train("--gin.MIXTURE_OR_TASK_NAME='squad_v1_devsplit'",
                                             "--gin.TASK_FEATURE_LENGTHS={'inputs': 256, 'targets': 16}"),
         ("dev-v1.1.json", "data[0].paragraphs[0]", "'text'"),
         _squad(lambda s: s["data"][0]["paragraphs"][0]["qas"][0]["answers"][0].pop("text"))),
    Case("vocab_missing", _train("--gin.VOCAB_PATH='/no/such/vocab.model'"), ("/no/such/vocab.model",)),
    Case("vocab_empty", _train(), ("bad.model", "SentencePiece"), _vocab(b"")),
    Case("vocab_corrupt", _train(), ("bad.model", "SentencePiece"), _vocab(b"\x00garbage\xff" * 100)),
    Case("model_dir_is_a_file", lambda tmp: _train_args(tmp / "file"), ("file",),
         lambda tmp, data: (tmp / "file").write_text("x") and {}),
    Case("initial_checkpoint_missing", lambda tmp: _train_args(
        tmp / "ft", "--gin.INITIAL_CHECKPOINT_PATH='/no/such/run'", command="finetune"), ("/no/such/run",)),
    Case("initial_checkpoint_truncated", lambda tmp: _train_args(
        tmp / "ft", f"--gin.INITIAL_CHECKPOINT_PATH='{tmp / 'run'}'", "--gin.TRAIN_STEPS=2", command="finetune"),
         ("checkpoint_1", "model.safetensors has"), _checkpoint(_truncate("model.safetensors"))),
    Case("resume_with_another_model", lambda tmp: [a.replace("tiny.gin", "small.gin")
                                                   for a in _train_args(tmp / "run", "--gin.TRAIN_STEPS=2")],
         ("T5Config.d_model = 512 in gin, 64 in the checkpoint",), _checkpoint()),
    Case("eval_checkpoint_missing", lambda tmp: ["eval", "--gin_file=gin/runs/eval.gin",
                                                 "--gin.CHECKPOINT_PATH='/no/such/run'",
                                                 "--gin.MIXTURE_OR_TASK_NAME='glue_rte'"], ("/no/such/run",)),
    Case("eval_checkpoint_truncated", lambda tmp: ["eval", "--gin_file=gin/runs/eval.gin",
                                                   f"--gin.CHECKPOINT_PATH='{tmp / 'run'}'",
                                                   "--gin.MIXTURE_OR_TASK_NAME='glue_rte'"],
         ("checkpoint_1", "model.safetensors has"), _checkpoint(_truncate("model.safetensors"))),
    Case("eval_quantize_unknown", _eval("--gin.evaluate_checkpoint.quantize='int4'"),
         ("evaluate_checkpoint.quantize = 'int4'", "int8")),
    Case("eval_quantize_flag_unknown", _eval("--quantize=int4"), ("--quantize", "'int4'")),
    Case("infer_quantize_in_bf16", lambda tmp: ["infer", "--gin_file=gin/runs/infer.gin", "--quantize=int8",
                                                "--gin.CHECKPOINT_PATH='/no/such/run'", "--gin.infer.precision='bf16'",
                                                f"--gin.OUTPUT_FILE='{tmp / 'out.jsonl'}'",
                                                "--gin.MIXTURE_OR_TASK_NAME='glue_rte'"],
         ("infer.quantize = 'int8'", "precision 'bf16'")),
    Case("report_not_an_experiment", lambda tmp: ["report", str(tmp)], ("no experiment.json",)),
    Case("mixture_unknown", lambda tmp: ["mixture", "show", "no_such_mixture"], ("no_such_mixture",)),
    # Issue 28: settings of the wrong type name the setting (they failed deep inside with a bare TypeError)
    Case("model_dir_a_number", _train("--gin.MODEL_DIR=42"), ("MODEL_DIR (train.model_dir) = 42", "a path")),
    Case("task_name_a_number", _train("--gin.MIXTURE_OR_TASK_NAME=7"), ("MIXTURE_OR_TASK_NAME", "= 7")),
    Case("learning_rate_a_word", _train("--gin.learning_rate.base='abc'"), ("learning_rate.base = 'abc'",)),
    Case("weight_decay_a_word", _train("--gin.make_optimizer.weight_decay='abc'"),
         ("make_optimizer.weight_decay = 'abc'",)),
    Case("betas_one_number", _train("--gin.make_optimizer.name='adamw'", "--gin.make_optimizer.betas=(0.9,)"),
         ("make_optimizer.betas = (0.9,)", "two numbers")),
    Case("seed_a_fraction", _train("--gin.train.seed=1.5"), ("train.seed = 1.5", "whole number")),
    Case("mean_span_zero", _train("--gin.MIXTURE_OR_TASK_NAME='span_corruption'",
                                  "--gin.objectives.span_corruption.mean_noise_span_length=0"),
         ("objectives.span_corruption.mean_noise_span_length = 0", ">= 1")),
    Case("temperature_a_word", _train("--gin.MIXTURE_OR_TASK_NAME='glue'", "--gin.mixing.temperature='hot'",
                                      "--gin.mixing.strategy='temperature'"),
         ("mixture glue", "mixing.temperature (T) = 'hot'")),
    Case("max_decode_length_zero", _eval("--gin.evaluate_checkpoint.max_decode_length=0"),
         ("evaluate_checkpoint.max_decode_length = 0",)),
    Case("num_beams_zero", _eval("--gin.evaluate_checkpoint.num_beams=0"), ("evaluate_checkpoint.num_beams = 0",)),
    Case("compile_decoding_not_bool", _eval("--gin.evaluate_checkpoint.compile_decoding='yes'"),
         ("evaluate_checkpoint.compile_decoding = 'yes'", "True or False")),
    Case("eval_batch_size_zero", _eval("--gin.evaluate_checkpoint.batch_size=0"),
         ("evaluate_checkpoint.batch_size = 0",)),
    Case("infer_input_not_utf8", _infer("in.txt"), ("in.txt:2", "not UTF-8"),
         _both(_checkpoint(), _text_file("in.txt", b"a line\nCaf\xe9\n"))),
    Case("conll_not_utf8", _train("--gin.MIXTURE_OR_TASK_NAME='conll2003_ner'"), ("conll2003/eng.train:4", "UTF-8"),
         lambda tmp, data: _data_with(tmp, data, "conll2003/eng.train", b"-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\n"
                                                                          b"Caf\xe9 NNP I-NP O\n")),
    Case("corpus_blank_lines_only", _train("--gin.MIXTURE_OR_TASK_NAME='span_corruption'"),
         ("corpus.txt", "no document (only blank lines)"), _corpus(b"\n   \n\n")),
    # ... and what was accepted without a word
    Case("learning_rate_negative", _train("--gin.learning_rate.base=-1.0"), ("learning_rate.base = -1.0", "> 0")),
    Case("warmup_negative", _train("--gin.learning_rate.warmup_steps=-5"), ("learning_rate.warmup_steps = -5",)),
    Case("eval_num_examples_zero", _eval("--gin.evaluate_checkpoint.num_examples=0"),
         ("evaluate_checkpoint.num_examples = 0",)),
    Case("eval_num_examples_negative", _train("--gin.train.eval_num_examples=-3"),
         ("train.eval_num_examples = -3",)),
    Case("eval_split_unknown", _eval("--gin.evaluate_checkpoint.split='bogus'"),
         ("evaluate_checkpoint.split = 'bogus'", "test, train, validation")),
    Case("corpus_not_text", _train("--gin.MIXTURE_OR_TASK_NAME='span_corruption'"),
         ("corpus.txt", "not a text file (a NUL byte at offset 0)"), _corpus(bytes(range(256)) * 64)),
    Case("corpus_undecodable_without_nul", _train("--gin.MIXTURE_OR_TASK_NAME='span_corruption'"),
         ("corpus.txt", "not a text file (", "control bytes in its first 8,000"), _corpus(bytes(range(1, 256)) * 64)),
    Case("mixture_show_steps_negative", lambda tmp: ["mixture", "show", "glue_rte", "--steps=-5"],
         ("--steps", "-5 is not a whole number >= 1")),
    Case("mixture_show_examples_zero", lambda tmp: ["mixture", "show", "glue_rte", "--examples=0"],
         ("--examples", "0 is not")),
    Case("tasks_show_n_negative", lambda tmp: ["tasks", "show", "--mixture_or_task=glue_rte", "--n=-1"],
         ("--n", "-1 is not")),
    Case("tasks_show_inputs_length_zero", lambda tmp: ["tasks", "show", "--mixture_or_task=glue_rte",
                                                       "--inputs_length=0"], ("--inputs_length", "0 is not")),
    Case("tasks_show_split_unknown", lambda tmp: ["tasks", "show", "--mixture_or_task=glue_rte", "--split=bogus"],
         ("--split=bogus", "test, train, validation")),
    Case("experiment_budget_zero", _experiment("--gin.BUDGET=0"), ("BUDGET = 0", "> 0")),
    Case("experiment_eval_num_examples_zero", _experiment("--gin.BUDGET=0.00001",
                                                          "--gin.experiment.eval_num_examples=0"),
         ("experiment.eval_num_examples = 0",)),
    Case("search_mixture_of_one_task", _search("glue_rte"), ("mixture glue_rte has one task",
                                                              "needs at least two")),
    Case("search_target_outside_the_mixture", _search("span_corruption_and_glue",
                                                      "--gin.mixture_search.target={'squad_v1_devsplit': 1.0}"),
         ("mixture_search.target names task squad_v1_devsplit", "not in mixture span_corruption_and_glue")),
    Case("search_too_few_runs", _search("span_corruption_and_glue", "--gin.mixture_search.num_runs=5"),
         ("mixture_search.num_runs = 5", "too few proxy runs", "at least 10")),
    Case("search_concentration_zero", _search("span_corruption_and_glue", "--gin.mixture_search.concentration=0"),
         ("mixture_search.concentration = 0",)),
    Case("search_unknown_model", _search("span_corruption_and_glue", "--gin.mixture_search.models=['cubic']"),
         ("mixture_search.models", "'cubic'", "linear, lightgbm, mixing_law")),
    Case("infer_empty_input", _infer("empty.txt"), ("empty.txt", "no lines"),
         _both(_checkpoint(), _text_file("empty.txt", b"\n\n"))),
    # ... and what stalled before step 1, ignoring SIGTERM
    Case("noise_density_two", _train("--gin.MIXTURE_OR_TASK_NAME='span_corruption'",
                                     "--gin.objectives.span_corruption.noise_density=2.0"),
         ("objectives.span_corruption.noise_density = 2.0", "in (0.0, 1.0)")),
    Case("batch_size_a_billion", _train("--gin.BATCH_SIZE=1000000000"),
         ("BATCH_SIZE = 1,000,000,000", "must be from 1 to")),
    Case("inputs_length_ten_million", _train("--gin.TASK_FEATURE_LENGTHS={'inputs': 10000000, 'targets': 8}"),
         ("TASK_FEATURE_LENGTHS['inputs'] = 10000000", "from 1 to 65,536")),
    # Resume and export safety
    Case("export_into_a_non_empty_directory", lambda tmp: ["export", f"--checkpoint={tmp / 'run'}",
                                                           f"--output={tmp}"], ("exists and is not empty",
                                                                                "--overwrite"), _checkpoint()),
    Case("export_over_its_own_checkpoint", lambda tmp: ["export", f"--checkpoint={tmp / 'run'}",
                                                        f"--output={tmp / 'run'}", "--overwrite"],
         ("holds the checkpoint being exported", "write the export elsewhere"), _checkpoint()),
    Case("resume_with_every_checkpoint_unreadable", _train("--gin.TRAIN_STEPS=2"),
         ("no checkpoint can be restored", "checkpoint_1: model.safetensors has", "start_over_if_unreadable"),
         _checkpoint(_truncate("model.safetensors"))),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_naming_the_culprit(case: Case, tmp_path, vocab_file, data_dir, capfd, monkeypatch):
    env = case.prepare(tmp_path, data_dir)
    for key, value in env.items():
        if key == "PYTHONPATH_EXTRA":
            monkeypatch.syspath_prepend(value)
        else:
            monkeypatch.setenv(key, value)
    capfd.readouterr()
    code = mtp_here(*case.args(tmp_path))
    err = capfd.readouterr().err
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]
    assert message.startswith(("mtp: error: ", "mtp ")) and "error: " in message, err[-2000:]
    for part in case.says:
        assert part in message, message


def test_compiled_decoding_without_a_compiler_is_one_line(tmp_path, capfd, monkeypatch):
    """`compile_decoding = True` where inductor finds no C++ compiler: one line naming the setting, before the
    checkpoint is read (CXX is read when torch imports inductor's config, so the search is set here, through the
    config's own `patch`: monkeypatch's undo deletes the setting, and later compiles in this process would fail)."""
    import torch._inductor.config as inductor

    with inductor.patch({"cpp.cxx": ("/no/such/c++",)}):
        code = mtp_here(*_eval("--gin.evaluate_checkpoint.compile_decoding=True")(tmp_path))
    message = capfd.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "evaluate_checkpoint.compile_decoding = True" in message and "C++ compiler" in message


def test_at_least_thirty_cases():
    assert len(CASES) >= 30


def test_debug_prints_the_traceback(tmp_path, vocab_file):
    with pytest.raises(ValueError, match="TRAIN_STEPS"):
        mtp_here("--debug", *_train_args(tmp_path / "run", "--gin.TRAIN_STEPS=0"))


NOISED = ["span_corruption", "iid_denoising", "drop_corrupted_tokens", "bert_mlm", "bert_mlm_wwm", "spanbert",
          "bart_infilling", "bart_token_masking", "bart_token_deletion", "electra_replaced_tokens",
          "ernie_entity_masking", "ernie_phrase_masking"]


@pytest.mark.parametrize("density", [0.0, -0.1, 1.0, 1.5, "high"])
@pytest.mark.parametrize("objective", NOISED)
def test_every_objective_refuses_a_noise_density_outside_zero_to_one(objective, density):
    """Checked before the objective touches its dataset (none is given here): 0 noises nothing, 1 leaves nothing to
    read, and t5's span helper loops forever above 1."""
    from tasks import objectives

    with pytest.raises(ValueError, match=rf"objectives\.{objective}\.noise_density = {re.escape(repr(density))}: "
                                         r"must be a number in \(0\.0, 1\.0\)"):
        getattr(objectives, objective)(None, None, None, noise_density=density)


def test_infer_says_which_input_lines_it_cut(tmp_path, vocab_file, capfd):
    _checkpoint()(tmp_path, Path())
    (tmp_path / "in.txt").write_text("a short line\n" + "word " * 400_000 + "\n")  # 2 MB
    assert mtp_here(*_infer("in.txt")(tmp_path)) == 0
    assert "in.txt: 1 of 2 input line(s) cut to 512 tokens" in capfd.readouterr().err
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2
