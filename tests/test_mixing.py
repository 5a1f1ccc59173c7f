"""Mixing rates: strategies, gin overrides, mixtures by task, measured shares, per-task losses, bad input."""

from __future__ import annotations

import json
import math

import gin
import numpy as np
import pytest
import seqio
import torch
from conftest import REPO, mtp, mtp_here

import tasks  # noqa: F401
from mtplatform import data, mixing, mixture_view
from mtplatform import model as model_lib
from mtplatform import train as train_lib
from tasks import mixtures

SMALL = {"inputs": 64, "targets": 16}
REAL = ("glue_cola", "glue_mrpc", "glue_rte", "glue_sst2", "span_corruption")
TEST_MIXTURE = "test_mixing_real"

if TEST_MIXTURE not in seqio.MixtureRegistry.names():
    mixing.register(TEST_MIXTURE, REAL)


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _bind(**values) -> None:
    for name, value in values.items():
        gin.bind_parameter(f"mixing.{name}", value)


# --- rates -----------------------------------------------------------------------------------------------------


def test_bert_exponent_s_07_turns_1000_to_1_into_about_126_to_1():
    # Multilingual BERT samples with exponent S = 0.7 of the size; as a temperature, T = 1 / S.
    rates = mixing.rates_from_sizes({"big": 1000.0, "small": 1.0},
                                    mixing.Settings(strategy="temperature", temperature=1 / 0.7, cap=None))
    assert rates["big"] / rates["small"] == pytest.approx(125.9, abs=0.1)


def test_unimax_worked_example_by_hand():
    # Budget 1,000 over sizes 10, 100, 5,000 with at most 2 epochs each. By hand: the smallest task could take
    # 1000 / 3 = 333 but is capped at 2 x 10 = 20; 980 left for two tasks: 490 each, but the 100-example task is
    # capped at 200; the 780 left go to the large task (780 <= 10,000).
    rates = mixing.unimax({"a": 10, "b": 100, "c": 5000}, budget=1000, max_epochs=2)
    assert rates == {"a": 20, "b": 200, "c": 780}
    # A budget above what every task can give: each gets its max_epochs.
    assert mixing.unimax({"a": 10, "b": 100}, budget=10**6, max_epochs=3) == {"a": 30, "b": 300}
    # Enough data everywhere: uniform.
    assert mixing.unimax({"a": 10**5, "b": 10**6}, budget=1000, max_epochs=1) == {"a": 500, "b": 500}


def test_proportional_and_temperature_equal_seqios_rate_function(data_dir):
    sizes = {t: seqio.get_mixture_or_task(t).num_input_examples("train") for t in REAL if t != "span_corruption"}
    for settings in (mixing.Settings(cap=2**12), mixing.Settings(strategy="temperature", temperature=3, cap=2**13)):
        ours = mixing.rates_from_sizes(sizes, settings)
        for task, rate in ours.items():
            theirs = seqio.mixing_rate_num_examples(seqio.get_mixture_or_task(task), maximum=settings.cap,
                                                    temperature=settings.temperature)
            assert rate == pytest.approx(theirs, rel=1e-12)


def test_gin_override_changes_a_registered_mixtures_rates(data_dir):
    mixture = seqio.get_mixture_or_task("span_corruption_and_glue")
    default = mixing.resolve(mixture)
    assert default.settings.strategy == "proportional" and default.rates["glue_sst2"] == 2**14  # capped at K
    assert default.rates["span_corruption"] == 2**14  # artificial size 1e6, capped
    gin.parse_config("mixing.strategy = 'temperature'\nmixing.temperature = 2.0")
    hot = mixing.resolve(mixture)
    assert hot.rates["glue_rte"] == pytest.approx(math.sqrt(2490))
    assert hot.shares["glue_wnli"] > default.shares["glue_wnli"]  # a higher T favours the small tasks
    assert mixture.get_rate(seqio.get_mixture_or_task("glue_rte")) == pytest.approx(math.sqrt(2490))  # seqio's API
    # A scoped binding changes the rates only inside its scope (an experiment's stage).
    gin.clear_config()
    gin.parse_config("arm/mixing.strategy = 'equal'")
    assert mixing.resolve(mixture).settings.strategy == "proportional"
    with gin.config_scope("arm"):
        assert set(mixing.resolve(mixture).rates.values()) == {1.0}
    # glue_proportional declares no cap; a gin binding still overrides the declaration.
    glue = seqio.get_mixture_or_task("glue_proportional")
    assert glue.declared == {"cap": None}
    _bind(cap=1000, drop_tasks_without_data=True)
    assert max(mixing.resolve(glue).rates.values()) == 1000


def test_mixtures_by_task_and_leave_one_out():
    names = set(seqio.MixtureRegistry.names())
    assert {"glue", "supervised", "supervised_and_span_corruption", "glue_proportional",
            "span_corruption_and_glue"} <= names
    supervised = {t.name for t in seqio.get_mixture_or_task("supervised").tasks}
    assert supervised == set(mixtures.SUPERVISED)
    assert {"glue_qqp", "glue_mnli", "glue_qnli", "squad_v1", "conll2003_ner", "glue_wnli"} <= supervised
    for task in mixtures.SUPERVISED:
        left = {t.name for t in seqio.get_mixture_or_task(f"leave_one_out_{task}").tasks}
        assert left == (supervised - {task}) | {"span_corruption"}


def test_missing_training_data_names_task_file_and_switch(data_dir, capsys):
    supervised = seqio.get_mixture_or_task("supervised")
    with pytest.raises(mixing.MixingError, match=r"mixture supervised: task glue_mnli, split 'train': expected data "
                                                 r"file .*MNLI/train.tsv.*--gin.mixing.drop_tasks_without_data=True"):
        mixing.resolve(supervised)
    _bind(drop_tasks_without_data=True)
    resolved = mixing.resolve(supervised)
    assert set(resolved.dropped) == {"glue_mnli", "glue_qnli", "glue_qqp", "squad_v1"}
    assert "train-v1.1.json" in resolved.dropped["squad_v1"]
    assert set(resolved.rates) == {"glue_cola", "glue_sst2", "glue_mrpc", "glue_stsb", "glue_rte", "glue_wnli",
                                   "conll2003_ner"}
    assert {t.name for t in supervised.tasks} == set(resolved.rates)  # evaluation sees the same tasks


# --- measured in the pipeline ------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy,params,wrong", [
    ("proportional", {"cap": 4000}, {"cap": None}),
    ("temperature", {"temperature": 3.0, "cap": None}, {"temperature": 2.0, "cap": None}),
    ("equal", {}, {"strategy": "proportional", "cap": 4000}),
])
def test_measured_shares_match_rates(strategy, params, wrong, data_dir, vocab_file):
    """Examples drawn from the real pipeline (seqio's sampler, preprocessing, packing) follow the rates.

    Chi-square goodness of fit at significance 0.001 on 3,000 examples over 5 tasks. The pipeline is seeded, so
    the draw is the same every run. Enough draws: the same counts reject a plausible wrong rate (the strategy with
    another parameter) at p < 1e-6.
    """
    _bind(strategy=strategy, **params)
    resolved, measured = mixture_view.measure(TEST_MIXTURE, SMALL, num_examples=3000)
    assert list(resolved.rates) == sorted(REAL)
    assert measured.examples.sum() >= 3000 and measured.examples_per_row > 1  # packed
    assert mixture_view.chi_square_p(resolved, measured) > 1e-3
    gin.clear_config()
    _bind(**{"strategy": strategy, **wrong})
    other = mixing.resolve(seqio.get_mixture_or_task(TEST_MIXTURE))
    assert mixture_view.chi_square_p(other, measured) < 1e-6


def test_a_cap_below_every_size_still_mixes(data_dir, vocab_file):
    """K = 2**10 caps every task (sizes 2,490 to 67,349 and the corpus' 1e6): the rates are all K, as floats, and
    the pipeline draws every task (integer rates once crashed tf.data's sample_from_datasets)."""
    name = "test_mixing_all_capped"
    mixing.register(name, list(REAL), replace_existing=True, strategy="proportional", cap=2**10)
    ds, resolved = data.train_dataset(mixture_or_task_name=name, task_feature_lengths=SMALL, batch_size=8)
    assert list(resolved.rates.values()) == [1024.0] * len(REAL)
    assert all(isinstance(rate, float) for rate in resolved.rates.values())
    seen = {int(i) for batch in ds.take(8).as_numpy_iterator() for i in np.unique(batch[data.TASK_IDS]) if i > 0}
    assert len(seen) >= 3


def test_unimax_budget_counts_the_examples_in_packed_rows(data_dir, vocab_file):
    """UniMax's default budget is the examples the run's rows hold, not the rows: packed at 64/16, a row holds
    about three GLUE examples, and counting rows instead let RTE, the smallest task, repeat more than twice its
    `max_epochs`."""
    name, rows, max_epochs = "test_mixing_unimax", 512, 0.025
    mixing.register(name, ["glue_rte", "glue_cola", "glue_sst2"], replace_existing=True, strategy="unimax",
                    max_epochs=max_epochs)
    ds, resolved = data.train_dataset(mixture_or_task_name=name, task_feature_lengths=SMALL, batch_size=32,
                                      budget_rows=rows)
    drawn = np.zeros(4)
    for batch in ds.take(rows // 32).as_numpy_iterator():
        drawn += data.count_by_task(batch[data.TASK_IDS], batch["decoder_positions"], 3)[0]
    examples = dict(zip(resolved.rates, drawn[1:], strict=True))
    assert resolved.settings.budget_examples == pytest.approx(drawn.sum(), rel=0.1)
    assert drawn.sum() > 2 * rows  # packed: the budget in rows would be less than half of it
    rte_cap = max_epochs * resolved.sizes["glue_rte"]  # 62 examples
    assert 0.7 * rte_cap < examples["glue_rte"] < 1.3 * rte_cap
    assert resolved.rates["glue_rte"] == pytest.approx(rte_cap)
    # Measured again, as a resumed run or another process measures it: the same budget, so the same rates.
    assert data.budget_examples(name, SMALL, rows, pack=True, packing="first_fit", seed=0) == \
        resolved.settings.budget_examples
    # Unpacked, a row is one example; a mixture whose rates ignore the run's length is not measured at all.
    assert data.budget_examples(name, SMALL, rows, pack=False, packing="first_fit", seed=0) == rows
    assert data.budget_examples(TEST_MIXTURE, SMALL, rows, pack=True, packing="first_fit", seed=0) is None


def test_task_ids_survive_packing(data_dir, vocab_file):
    """Every target token carries its example's task, packed or not; padding carries 0."""
    for pack in (True, False):
        ds, resolved = data.train_dataset(mixture_or_task_name=TEST_MIXTURE, task_feature_lengths=SMALL,
                                          batch_size=8, pack=pack)
        for batch in ds.take(4).as_numpy_iterator():
            ids = batch[data.TASK_IDS]
            assert ((ids > 0) == (batch["decoder_loss_weights"] > 0)).all()
            if pack:  # one task per segment
                for row_ids, segs in zip(ids, batch["decoder_segment_ids"], strict=True):
                    for seg in set(segs[segs > 0].tolist()):
                        assert len(set(row_ids[segs == seg].tolist())) == 1


# --- per-task losses ---------------------------------------------------------------------------------------------


def _batches(pack: bool) -> list[dict[str, torch.Tensor]]:
    """The same 12 examples of two real tasks, as one packed or one padded batch."""
    examples = []
    for task_id, name in enumerate(("glue_rte", "glue_sst2"), start=1):
        ds = seqio.get_mixture_or_task(name).get_dataset(SMALL, split="train", shuffle=False, use_cached=False)
        examples += [{**ex, "targets_task": np.full(len(ex["targets"]), task_id, np.int32)}
                     for ex in ds.take(6).as_numpy_iterator()]
    import tensorflow as tf

    ds = tf.data.Dataset.from_generator(lambda: ({k: ex[k] for k in ("inputs", "targets", "targets_task")}
                                                 for ex in examples),
                                        output_signature={k: tf.TensorSpec([None], tf.int32)
                                                          for k in ("inputs", "targets", "targets_task")})
    converted = data.TaskIdFeatureConverter(pack=pack)(ds, SMALL)
    batch = next(converted.batch(12).as_numpy_iterator())
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def test_per_task_losses_sum_to_the_batch_loss_and_ignore_packing(data_dir, vocab_file):
    torch.manual_seed(3)
    model = model_lib.T5(model_lib.T5Config(vocab_size=4096, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                            num_heads=2)).eval()
    figures = {}
    for pack in (True, False):
        batch = _batches(pack)
        meter = train_lib.TaskMeter(["glue_rte", "glue_sst2"])
        with torch.no_grad():
            token_loss, weights = model.token_losses(batch)
            loss, weight = model.loss(batch)
        meter.add(meter.step_counts(batch, token_loss))
        values = meter.log_values()
        per_task = [(values[f"task/{t}/loss"], values[f"task/{t}/target_tokens"]) for t in ("glue_rte", "glue_sst2")]
        assert sum(loss_t * n for loss_t, n in per_task) / sum(n for _, n in per_task) == pytest.approx(
            (loss / weight).item(), rel=1e-6)
        assert values["task/glue_rte/examples"] == values["task/glue_sst2/examples"] == 6
        figures[pack] = values
    for key in figures[True]:
        assert figures[True][key] == pytest.approx(figures[False][key], rel=1e-5), key


def test_task_loss_weights():
    names = ["a", "b"]
    assert train_lib.task_weight_vector(names, None) is None
    assert train_lib.task_weight_vector(names, {"b": 2.0}).tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="train.task_loss_weights names c, not a task"):
        train_lib.task_weight_vector(names, {"c": 1.0})
    with pytest.raises(ValueError, match=r"train.task_loss_weights\['a'\] = -1.0"):
        train_lib.task_weight_vector(names, {"a": -1.0})
    batch = {"decoder_loss_weights": torch.tensor([[1, 1, 1, 0]]), data.TASK_IDS: torch.tensor([[1, 1, 2, 0]])}
    assert train_lib.loss_weights(batch, None).tolist() == [[1, 1, 1, 0]]
    assert train_lib.loss_weights(batch, torch.tensor([0.0, 1.0, 1.0])).tolist() == [[1, 1, 1, 0]]
    assert train_lib.loss_weights(batch, torch.tensor([0.0, 0.5, 3.0])).tolist() == [[0.5, 0.5, 3.0, 0.0]]


# --- declared in gin, and bad input ------------------------------------------------------------------------------


def test_mixture_declared_in_gin(data_dir):
    gin.parse_config("""
mixtures.declared = {
    "gin_small_glue": {"tasks": ["glue_rte", "glue_mrpc", "glue_cola"], "strategy": "explicit",
                       "weights": {"glue_rte": 1.0, "glue_mrpc": 2.0, "glue_cola": 0.0}},
}
""")
    assert mixing.register_declared() == ["gin_small_glue"]
    resolved = mixing.resolve(seqio.get_mixture_or_task("gin_small_glue"))
    assert resolved.shares == {"glue_cola": 0.0, "glue_mrpc": pytest.approx(2 / 3), "glue_rte": pytest.approx(1 / 3)}
    gin.parse_config("mixing.strategy = 'equal'")  # a binding overrides the declaration
    assert set(mixing.resolve(seqio.get_mixture_or_task("gin_small_glue")).rates.values()) == {1.0}
    # The shipped file: a declared mixture may name another declared mixture, which stands for its tasks.
    gin.clear_config()
    gin.parse_config_file(str(REPO / "gin/mixtures/shared_data.gin"))
    assert mixing.register_declared() == ["shared_supervised", "shared_supervised_with_wnli_and_span_corruption"]
    both = mixing.resolve(seqio.get_mixture_or_task("shared_supervised_with_wnli_and_span_corruption"))
    assert set(both.rates) == {*mixtures.SHARED_GLUE, "squad_v1_devsplit", "conll2003_ner", "span_corruption"}
    assert not both.dropped  # every task has its data here
    # The built-in one (the mixing experiments' tasks): the same without WNLI.
    built_in = mixing.resolve(seqio.get_mixture_or_task("shared_supervised_and_span_corruption"))
    assert set(built_in.rates) == set(both.rates) - {"glue_wnli"} and not built_in.dropped
    gin.clear_config()
    gin.parse_config('mixtures.declared = {"span_corruption_and_glue": {"tasks": ["glue_rte"]}}')
    with pytest.raises(mixing.MixingError, match="span_corruption_and_glue .*already registered in Python"):
        mixing.register_declared()


def test_bad_mixtures_and_settings_are_one_line_errors(data_dir, tmp_path, monkeypatch):
    rte = {"glue_rte": 2490.0, "glue_mrpc": 3668.0}
    cases = [
        (lambda: mixing.register("bad_unknown", ["glue_rte", "glue_nope"]),
         "mixture bad_unknown: no task or mixture named 'glue_nope'"),
        (lambda: mixing.rates_from_sizes(rte, mixing.Settings(strategy="explicit", weights={"glue_rte": 0,
                                                                                             "glue_mrpc": 0}), "m"),
         "mixture m: every task's rate is zero"),
        (lambda: mixing.rates_from_sizes(rte, mixing.Settings(strategy="explicit", weights={"glue_rte": -1,
                                                                                             "glue_mrpc": 1}), "m"),
         "mixture m: task glue_rte has rate -1.0"),
        (lambda: mixing.rates_from_sizes(rte, mixing.Settings(strategy="explicit", weights={"glue_rte": math.nan,
                                                                                             "glue_mrpc": 1}), "m"),
         "mixture m: task glue_rte has rate nan"),
        (lambda: mixing.rates_from_sizes(rte, mixing.Settings(strategy="explicit", weights={"glue_rte": 1}), "m"),
         "mixture m: mixing.weights has no rate for task glue_mrpc"),
        (lambda: mixing.rates_from_sizes(rte, mixing.Settings(strategy="temperature", temperature=0), "m"),
         r"mixture m: mixing.temperature \(T\) = 0 must be a finite number > 0"),
        (lambda: mixing.rates_from_sizes(rte, mixing.Settings(strategy="temperature", temperature="hot"), "m"),
         r"mixture m: mixing.temperature \(T\) = 'hot' must be a finite number > 0"),
        (lambda: mixing.resolve(seqio.MixtureRegistry.add("test_zero_rates", [("glue_rte", 0), ("glue_mrpc", 0)])),
         r"mixture test_zero_rates: every task's rate is zero \(seqio rates\)"),
        (lambda: mixing.resolve(seqio.MixtureRegistry.add("test_negative_rate", [("glue_rte", -1.0),
                                                                                 ("glue_mrpc", 1)])),
         r"mixture test_negative_rate: task glue_rte has rate -1.0 \(seqio rates\)"),
        (lambda: mixing.rates_from_sizes(rte, mixing.Settings(cap=-5), "m"),
         r"mixture m: mixing.cap \(K\) = -5 must be a finite number > 0, or None"),
        (lambda: mixing.rates_from_sizes(rte, mixing.Settings(strategy="hot"), "m"),
         "mixture m: mixing.strategy='hot' is none of"),
        (lambda: mixing.rates_from_sizes(rte, mixing.Settings(strategy="unimax"), "m"),
         "mixture m: mixing.strategy='unimax' needs a budget"),
        (lambda: mixing.register("bad_setting", ["glue_rte"], temprature=2),
         "mixture bad_setting: unknown setting.s. temprature"),
    ]
    for make, message in cases:
        with pytest.raises(mixing.MixingError, match=message) as caught:
            make()
        assert "\n" not in str(caught.value)
    # Tasks with another vocabulary cannot be mixed.
    other_vocab = {k: seqio.Feature(vocabulary=seqio.PassThroughVocabulary(size=100), add_eos=True, required=False)
                   for k in ("inputs", "targets")}
    rte_task = seqio.get_mixture_or_task("glue_rte")
    seqio.TaskRegistry.add("test_other_vocab_rte", source=rte_task.source, preprocessors=rte_task.preprocessors,
                           output_features=other_vocab, metric_fns=[])
    try:
        with pytest.raises(mixing.MixingError, match="mixture bad_vocab: task test_other_vocab_rte has another "
                                                     "vocabulary or dtype for feature 'inputs' than task glue_rte"):
            mixing.register("bad_vocab", ["glue_rte", "test_other_vocab_rte"])
        # ... nor tasks with other output features (here: targets only, no inputs).
        seqio.TaskRegistry.add("test_targets_only_rte", source=rte_task.source,
                               preprocessors=rte_task.preprocessors, metric_fns=[],
                               output_features={"targets": rte_task.output_features["targets"]})
        with pytest.raises(mixing.MixingError, match=r"mixture bad_features: task test_targets_only_rte has output "
                                                     r"features \['targets'\], task glue_rte \['inputs', 'targets'\]"):
            mixing.register("bad_features", ["glue_rte", "test_targets_only_rte"])
    finally:  # other tests go through every registered task
        for name in ("test_other_vocab_rte", "test_targets_only_rte"):
            if name in seqio.TaskRegistry.names():
                seqio.TaskRegistry.remove(name)


# --- the command and a real run ----------------------------------------------------------------------------------


def _rows(stdout: str) -> dict[str, list[str]]:
    return {cells[1].strip(): [c.strip() for c in cells[2:-1]]
            for cells in (line.split("|") for line in stdout.splitlines() if line.startswith("| glue_")
                          or line.startswith("| span_"))}


def _show(capsys, *args: str) -> tuple[int, str, str]:
    """`mtp mixture show ...` in this process (the same code as the command, without a second TensorFlow start)."""
    code = mtp_here("mixture", "show", *args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_mixture_show_and_temperature_override(tmp_path, data_dir, vocab_file, capsys):
    common = ("span_corruption_and_glue", "--examples=600", "--inputs_length=64", "--targets_length=16",
              "--steps=100", "--batch_size=8")
    code, plain, _ = _show(capsys, *common, f"--plot={tmp_path / 'shares.png'}")
    assert code == 0
    code, hot, _ = _show(capsys, *common, "--gin.mixing.strategy='temperature'", "--gin.mixing.temperature=4.0")
    assert code == 0
    assert "strategy proportional" in plain and "strategy temperature, K 16384, T 4.0" in hot
    a, b = _rows(plain), _rows(hot)
    assert set(a) == {"span_corruption", *mixtures.SHARED_GLUE}
    assert a["glue_rte"][1] == "2490" and float(b["glue_rte"][1]) == pytest.approx(2490 ** 0.25, rel=1e-3)
    assert float(b["glue_wnli"][2].rstrip("%")) > float(a["glue_wnli"][2].rstrip("%"))
    assert a["glue_sst2"][0] == "67,349" and a["span_corruption"][0] == "1,000,000 (artificial)"
    assert a["glue_rte"][4] != "-" and a["span_corruption"][4] == "-"  # epochs: none for a corpus
    assert "measured on" in plain and "chi-square" in plain
    assert (tmp_path / "shares.png").stat().st_size > 10_000
    code, online, _ = _show(capsys, *common, "--gin.mixing.strategy='online'", "--gin.mixing.online.initial="
                            "'temperature'", "--gin.mixing.temperature=4.0")
    assert code == 0 and "online (odm): the rates below are where a run starts (temperature)" in online
    assert _rows(online)["glue_rte"][1] == b["glue_rte"][1]  # it starts from T = 4's rates
    code, _, err = _show(capsys, "supervised", "--examples=10")
    assert code == 2 and err.count("\n") == 1
    assert "mixture supervised: task glue_mnli" in err and "--gin.mixing.drop_tasks_without_data=True" in err


@pytest.mark.slow  # the default suite's 15-minute budget (19.5 min on an AVX2 CPU without it)
def test_twenty_step_run_logs_per_task_figures(tmp_path, data_dir, vocab_file):
    run = tmp_path / "run"
    out = mtp("train", "--gin_file=gin/models/tiny.gin", "--gin_file=gin/runs/pretrain.gin",
              "--gin.MIXTURE_OR_TASK_NAME='span_corruption_and_glue'", "--gin.TRAIN_STEPS=20",
              f"--gin.MODEL_DIR='{run}'", "--gin.BATCH_SIZE=8", "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, "
              "'targets': 16}", "--gin.train.log_every=10", "--gin.train.precision='fp32'")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20]
    names = ["span_corruption", *mixtures.SHARED_GLUE]
    for task in names:
        assert rows[1][f"task/{task}/examples"] >= rows[0][f"task/{task}/examples"] > 0 or task == "glue_wnli"
        assert rows[1][f"task/{task}/target_tokens"] >= rows[0][f"task/{task}/target_tokens"]
    total_tokens = sum(rows[1][f"task/{t}/target_tokens"] for t in names)
    assert total_tokens <= 20 * 8 * 16
    for row in rows:
        losses = [(row[f"task/{t}/loss"], row[f"task/{t}/target_tokens"]) for t in names if f"task/{t}/loss" in row]
        assert all(math.isfinite(loss) and loss > 0 for loss, _ in losses)
    report = json.loads((run / "mixture.json").read_text())
    assert report["mixture"] == "span_corruption_and_glue" and set(report["tasks"]) == set(names)
    assert sum(t["share"] for t in report["tasks"].values()) == pytest.approx(1.0)
