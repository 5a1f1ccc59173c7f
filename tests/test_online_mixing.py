"""Online mixing (`mixing.strategy = 'online'`): the stream's features equal the fixed pipeline's, draws follow the
shares, the algorithms move the shares as their papers say, runs resume bit for bit, bad settings are one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import torch
from conftest import train_tiny
from safetensors.torch import load_file

import tasks  # noqa: F401
from mtplatform import checkpoints, data, mixing, online_mixing, online_stream

LENGTHS = {"inputs": 64, "targets": 16}
TASKS = ["glue_cola", "glue_rte", "span_corruption"]
MIXTURE = "test_online_cola_rte_span"
TIMINGS = ("tokens_per_second", "flops_per_second", "data_wait_fraction")


def _register(**online) -> str:
    mixing.register(MIXTURE, TASKS, replace_existing=True, strategy="online", online=online or None)
    return MIXTURE


def _train(model_dir: Path, steps: int, bindings: tuple[str, ...] = (), **overrides) -> dict:
    return train_tiny(model_dir, steps, MIXTURE, LENGTHS, bindings, **overrides)


def _rows(model_dir: Path) -> dict[int, dict]:
    rows = {}
    for row in map(json.loads, checkpoints.metrics_file(model_dir).read_text().splitlines()):
        rows[row["step"]] = {k: v for k, v in row.items() if k not in TIMINGS}
    return rows


def _examples(task: str, task_id: int, n: int) -> list[dict]:
    ds = data.task_examples(task, task_id, task, LENGTHS, "train", 0, None)
    return [{"inputs": ex["inputs"][:LENGTHS["inputs"]], "targets": ex["targets"][:LENGTHS["targets"]],
             "targets_task": ex["targets_task"][:LENGTHS["targets"]]} for ex in ds.take(n).as_numpy_iterator()]


@pytest.mark.parametrize("pack", [True, False])
def test_the_online_stream_makes_the_features_the_fixed_pipeline_makes(vocab_file, pack):
    # Real examples of two tasks, interleaved; packed by the fixed pipeline's converter (first fit over one buffer)
    # and by the online stream's numpy packer: the same rows, features, dtypes and task ids.
    examples = [ex for pair in zip(_examples("glue_cola", 1, 12), _examples("glue_sst2", 2, 12), strict=True)
                for ex in pair]
    ds = tf.data.Dataset.from_generator(lambda: iter(examples), output_signature={
        k: tf.TensorSpec([None], tf.int32) for k in ("inputs", "targets", "targets_task")})
    want = list(data.TaskIdFeatureConverter(pack=pack)(ds, LENGTHS).as_numpy_iterator())
    rows, room = [], []
    for ex in examples:
        online_stream.place(rows, room, (int(ex["targets_task"][0]), ex["inputs"], ex["targets"]), LENGTHS, pack)
    got = online_stream.features(rows, LENGTHS, pack)
    assert len(want) == len(rows) < (len(examples) if pack else len(examples) + 1)
    assert set(got) == set(want[0])
    for key, value in got.items():
        expected = np.stack([row[key] for row in want])
        assert value.dtype == expected.dtype and np.array_equal(value, expected), key


def _stream(shares, batch_size=8) -> online_stream.OnlineStream:
    stream = online_stream.OnlineStream(TASKS, MIXTURE, LENGTHS, batch_size, pack=True, seed=0)
    stream.set_shares(shares)
    return stream


def _examples_by_task(batches) -> np.ndarray:
    counts = np.zeros(len(TASKS) + 1)
    for batch in batches:
        counts += data.count_by_task(batch[data.TASK_IDS].numpy(), batch["decoder_positions"].numpy(), len(TASKS))[0]
    return counts[1:]


def test_the_stream_draws_by_the_shares_in_force_and_resumes_exactly(tmp_path, vocab_file):
    _register()
    stream = _stream([0.2, 0.2, 0.6])
    first = _examples_by_task(next(stream) for _ in range(30))
    stream.set_shares([0.7, 0.2, 0.1])
    stream.save(tmp_path / "position")
    after = [next(stream) for _ in range(60)]
    second = _examples_by_task(after)
    for counts, shares in ((first, [0.2, 0.2, 0.6]), (second, [0.7, 0.2, 0.1])):
        # Two binomial standard errors around each share (the pool delays at most two batches' worth of examples).
        n = counts.sum()
        assert np.all(np.abs(counts / n - shares) < 2.5 * np.sqrt(np.multiply(shares, 1 - np.array(shares)) / n)
                      + 2 * 16 / n), (counts / n, shares)
    resumed = _stream([0.2, 0.2, 0.6])  # the position carries its own shares, open rows and draws
    resumed.restore(tmp_path / "position")
    for want in after:
        got = next(resumed)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_position_saved_while_the_iterators_autotuned_resumes_exactly(tmp_path, vocab_file, monkeypatch):
    # Runs before `tf_setup.without_autotune` saved autotuned iterators: each task's pipeline keeps its structure
    # without autotuning (it ends in a prefetch), so their positions resume as they are.
    _register()
    with monkeypatch.context() as before_the_change:
        before_the_change.setattr(online_stream, "without_autotune", lambda ds: ds)
        before = _stream([0.3, 0.3, 0.4])
    assert [it._dataset.options().autotune.enabled for it in before._fetcher._iterators] == [None] * len(TASKS)
    for _ in range(4):
        next(before)
    before.save(tmp_path / "position")
    after = [next(before) for _ in range(6)]
    resumed = _stream([0.3, 0.3, 0.4])
    assert [it._dataset.options().autotune.enabled for it in resumed._fetcher._iterators] == [False] * len(TASKS)
    resumed.restore(tmp_path / "position")
    for want in after:
        got = next(resumed)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_odm_raises_the_share_of_the_task_with_the_highest_loss_and_explores():
    mixer = online_mixing.OnlineMixer(online_mixing.OnlineSettings(algorithm="odm"), ["a", "b", "c"],
                                      {"a": 1.0, "b": 1.0, "c": 1.0})
    for step in range(1, 201):
        mixer.observe(step, np.array([1.0, 2.0, 4.0]) * 100, np.array([100.0, 100.0, 100.0]), None)
    assert mixer.shares[2] > mixer.shares[1] > mixer.shares[0]
    k, t = 3, mixer.updates
    assert mixer.updates == 200 and mixer.shares.min() >= np.sqrt(np.log(k) / (k * t)) - 1e-12  # e_t explores
    assert mixer.shares.sum() == pytest.approx(1.0)


def test_doremi_follows_the_excess_loss_and_smooths_towards_uniform():
    settings = online_mixing.OnlineSettings(algorithm="doremi", reference="ref", step_size=1.0, smoothing=1e-3)
    mixer = online_mixing.OnlineMixer(settings, ["a", "b"], {"a": 0.5, "b": 0.5})
    mixer.observe(1, np.array([300.0, 300.0]), np.array([100.0, 100.0]), np.array([0.0, 100.0]))
    # One step of exponentiated gradient: shares ~ 0.5 exp(0) : 0.5 exp(1), then 0.1% of uniform mixed in.
    want = np.array([1.0, np.e]) / (1.0 + np.e) * (1 - 1e-3) + 1e-3 / 2
    assert np.allclose(mixer.shares, want)
    floored = online_mixing.OnlineMixer(online_mixing.OnlineSettings(algorithm="doremi", reference="ref",
                                                                     step_size=50.0, floor=0.1),
                                        ["a", "b"], {"a": 0.5, "b": 0.5})
    floored.observe(1, np.array([300.0, 300.0]), np.array([100.0, 100.0]), np.array([0.0, 100.0]))
    # The update would starve a (e^-50, plus its 1e-3 / 2 of uniform); the floor keeps 0.1 + (1 - 2 x 0.1) of that.
    assert floored.shares[0] == pytest.approx(0.1 + 0.8 * 5e-4, abs=1e-9)


def test_warm_up_and_update_interval_hold_the_shares():
    settings = online_mixing.OnlineSettings(update_every=5, warmup_steps=10)
    mixer = online_mixing.OnlineMixer(settings, ["a", "b"], {"a": 0.25, "b": 0.75})
    changed = [mixer.observe(s, np.array([100.0, 50.0]), np.array([10.0, 10.0]), None) for s in range(1, 21)]
    assert changed == [s in (15, 20) for s in range(1, 21)]
    assert mixer.updates == 2


def test_an_online_run_resumes_exactly_and_logs_its_rates(tmp_path, vocab_file):
    _register(algorithm="odm")
    _train(tmp_path / "once", 8)
    _train(tmp_path / "twice", 4)
    _train(tmp_path / "twice", 8)
    once, twice = _rows(tmp_path / "once"), _rows(tmp_path / "twice")
    assert once == {s: twice[s] for s in once}  # losses, per-task figures and rates, bit for bit
    once_weights, twice_weights = (load_file(str(tmp_path / run / "checkpoint_8" / "model.safetensors"))
                                   for run in ("once", "twice"))
    assert all(torch.equal(once_weights[k], twice_weights[k]) for k in once_weights)
    rates = [{t: row[f"rate/{t}"] for t in TASKS} for row in once.values()]
    assert all(sum(r.values()) == pytest.approx(1.0) for r in rates) and rates[0] != rates[-1]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(checkpoints.tensorboard_dir(tmp_path / "once"))).Reload()
    logged = board.Scalars("rate/glue_rte")
    assert [e.step for e in logged] == list(once)
    assert [e.value for e in logged] == pytest.approx([row["rate/glue_rte"] for row in once.values()], rel=1e-6)
    recorded = checkpoints.read_mixture(tmp_path / "once")
    assert recorded["settings"]["strategy"] == "online" and recorded["settings"]["online"]["algorithm"] == "odm"
    # Settings that would change a resumed run's shares are refused, naming the setting.
    with pytest.raises(ValueError, match=r"rates would change on resume \(mixing.online = .*'step_size': 2.0"):
        _train(tmp_path / "twice", 12, bindings=("mixing.online.step_size = 2.0",))


@pytest.mark.slow  # DoReMi's update is checked in the default suite on known losses, its resume here
def test_doremi_runs_on_a_reference_and_resumes_exactly(tmp_path, vocab_file):
    mixing.register("test_online_reference", TASKS, replace_existing=True)
    _train(tmp_path / "reference", 4, mixture_or_task_name="test_online_reference")
    _register(algorithm="doremi", reference=str(tmp_path / "reference"), step_size=5.0)
    _train(tmp_path / "once", 8)
    _train(tmp_path / "twice", 4)
    _train(tmp_path / "twice", 8)
    once, twice = _rows(tmp_path / "once"), _rows(tmp_path / "twice")
    assert once == {s: twice[s] for s in once}
    assert once[3]["rate/glue_cola"] != pytest.approx(1 / 3)  # the excess loss moved the shares


def test_measured_shares_follow_the_rates_over_a_run(tmp_path, vocab_file):
    _register(algorithm="odm", initial="equal")
    _train(tmp_path / "run", 40, log_every=1, checkpoint_every=40)
    rows = [r for _, r in sorted(_rows(tmp_path / "run").items())]
    examples = np.array([[r[f"task/{t}/examples"] for t in TASKS] for r in rows])
    rates = np.array([[r[f"rate/{t}"] for t in TASKS] for r in rows])
    drawn = examples[-1] / examples[-1].sum()
    expected = (np.diff(examples.sum(axis=1), prepend=0)[:, None] * np.vstack([[1 / 3] * 3, rates[:-1]])).sum(0)
    expected /= expected.sum()
    assert np.abs(drawn - expected).max() < 0.08, (drawn, expected)


@pytest.mark.parametrize("online, message", [
    ({"step_size": -1.0}, r"mixing.online.step_size = -1.0 must be a number > 0"),
    ({"algorithm": "exp4"}, r"mixing.online.algorithm = 'exp4' is none of odm, doremi"),
    ({"algorithm": "doremi"}, r"mixing.online.algorithm = 'doremi' needs mixing.online.reference"),
    ({"initial": "online"}, r"mixing.online.initial = 'online' must be a fixed strategy"),
    ({"floor": 0.5}, r"mixing.online.floor = 0.5 must be a number >= 0 and < 0.3333 \(1/K, K = 3 tasks\)$"),
    ({"update_every": 0}, r"mixing.online.update_every = 0 must be an integer >= 1"),
    ({"explore": 0.1}, r"unknown online setting\(s\) explore"),
])
def test_bad_online_settings_are_one_line(tmp_path, vocab_file, online, message):
    with pytest.raises(ValueError, match=rf"mixture {MIXTURE}: {message}"):
        _register(**online)
        _train(tmp_path / "run", 1)


def test_a_reference_of_another_model_or_vocabulary_is_refused(tmp_path, vocab_file):
    mixing.register("test_online_reference", TASKS, replace_existing=True)
    _train(tmp_path / "small", 1, mixture_or_task_name="test_online_reference", bindings=("T5Config.d_ff = 32",))
    _register(algorithm="doremi", reference=str(tmp_path / "small"))
    with pytest.raises(ValueError, match=r"mixing.online.reference=.*small: the reference is another model: d_ff 32 "
                                         r"\(this run's 128\)"):
        _train(tmp_path / "run", 1)
    _train(tmp_path / "other_vocab", 1, mixture_or_task_name="test_online_reference")
    state_file = tmp_path / "other_vocab" / "checkpoint_1" / "train_state.pt"
    state = torch.load(state_file, weights_only=False)
    state["vocabulary"] = {**state["vocabulary"], "sha256": "0" * 64}  # as a run with another vocabulary saves it
    torch.save(state, state_file)
    _register(algorithm="doremi", reference=str(tmp_path / "other_vocab"))
    with pytest.raises(ValueError, match=r"mixing.online.reference=.*other_vocab: it was trained with "
                                         r"another vocabulary \(.* sha256 000000000000"):
        _train(tmp_path / "run", 1)
    _register(algorithm="doremi", reference=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"mixing.online.reference=.*missing: no such checkpoint"):
        _train(tmp_path / "run", 1)


@pytest.mark.slow
def test_the_online_mixing_experiment_trains_reports_and_plots(tmp_path, vocab_file, capfd):
    """gin/experiments/online_mixing.gin, tiny: DoReMi's reference is the fixed arm's model of the same seed; the
    evaluations before the last are teacher-forced only; the report gives each online arm's steps to the fixed
    arm's last training loss and held-out target NLL, its shares, and plots the trajectories."""
    from test_experiment import _in_process

    exp = tmp_path / "exp"
    code, err = _in_process(
        capfd, "experiment", "--gin_file=gin/experiments/online_mixing.gin", "--gin_file=gin/models/tiny.gin",
        f"--gin.EXPERIMENT_DIR='{exp}'", "--gin.BUDGET=0.00003", "--gin.online_mixing.tasks=['glue_rte', "
        "'glue_stsb']", "--gin.experiment.eval_num_examples=8", "--gin.experiment.evals_per_stage=2",
        "--gin.BATCH_SIZE=4", "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}", "--gin.train.log_every=4",
        "--gin.evaluate_checkpoint.max_decode_length=8")
    assert code == 0, err[-3000:]
    spec = json.loads((exp / "experiment.json").read_text())
    assert [arm["name"] for arm in spec["arms"]] == ["proportional K=2^14", "online ODM", "online DoReMi eta=0.01"]
    doremi = spec["arms"][-1]["stages"][0]
    assert doremi["reference"] == "start"
    recorded = checkpoints.read_mixture(exp / doremi["name"] / "seed_0")["settings"]
    assert recorded["cap"] == 16384 and recorded["online"] == {
        **online_mixing.DEFAULTS.__dict__, "algorithm": "doremi", "initial": "proportional", "step_size": 0.01,
        "reference": str(exp / "start" / "seed_0")}
    # Teacher-forced at step 12, decoded at 24 (the last): a curve of target NLL, a score at the end only.
    curve = json.loads((exp / "results.json").read_text())["arms"][1]["tasks"]["glue_rte"]["seeds"][0]["curve"]
    assert [p["step"] for p in curve] == [12, 24] and "score" not in curve[0] and "score" in curve[1]
    results = json.loads((exp / "results.json").read_text())
    online = {entry["arm"]: entry for entry in results["online_steps_to_reach"]}
    assert set(online) == {"online ODM", "online DoReMi eta=0.01"}
    for entry in online.values():
        assert entry["start"] == "proportional K=2^14" and "held-out target NLL" in entry["measures"]
        assert entry["measures"]["held-out target NLL"][0]["start_steps"] in (12, 24)  # the fixed arm reaches its own
    report = (exp / "results.md").read_text()
    assert "## Online mixing against its fixed start" in report
    assert "- *online ODM* minus *proportional K=2^14*, held-out target NLL" in report
    against = online["online ODM"]["target_nll_against_start"]
    assert [d["task"] for d in against] == ["glue_rte", "glue_stsb", "GLUE average", "mean over the tasks"]
    assert against[-1]["difference"] == pytest.approx((against[0]["difference"] + against[1]["difference"]) / 2)
    assert "- *online ODM*, held-out target NLL (seeds 0): reaches *proportional K=2^14*'s last value" in report
    assert "Mixture of **online ODM** (`exp_online_0`, online; `rates.png`): initial share" in report
    assert (exp / "rates.png").stat().st_size > 10_000 and (exp / "target_nll_curves.png").stat().st_size > 10_000


@pytest.mark.slow  # three torchrun starts of two processes
def test_two_processes_agree_on_the_shares_and_resume_exactly(tmp_path, vocab_file):
    """Each process draws its own shard by the same shares (computed from the per-task losses summed over both),
    and a 2-process online run stopped at step 8 and resumed gives what an uninterrupted one gives."""
    from test_train import _torchrun

    common = ["--gin_file=gin/models/tiny.gin", "--gin_file=gin/runs/pretrain.gin",
              f"--gin.MIXTURE_OR_TASK_NAME='{MIXTURE}_ddp'", "--gin.BATCH_SIZE=8",
              f"--gin.mixtures.declared={{'{MIXTURE}_ddp': {{'tasks': {TASKS}, 'strategy': 'online'}}}}",
              "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}", "--gin.train.log_every=4",
              "--gin.train.checkpoint_every=8", "--gin.train.precision='fp32'"]
    once, twice = tmp_path / "once", tmp_path / "twice"
    for model_dir, steps, port in ((once, 16, 29541), (twice, 8, 29542), (twice, 16, 29543)):
        out = _torchrun(*common, f"--gin.TRAIN_STEPS={steps}", f"--gin.MODEL_DIR='{model_dir}'", port=port)
        assert out.returncode == 0, out.stderr[-3000:]
    assert _rows(once) == {step: row for step, row in _rows(twice).items() if step in _rows(once)}
    checkpoint = once / "checkpoint_16"
    shares = torch.load(checkpoint / "train_state.pt", weights_only=False)["online_mixer"]["shares"]
    for rank in (0, 1):
        saved = json.loads((checkpoint / f"data_rank{rank}" / online_stream.STATE_FILE).read_text())
        assert np.allclose(np.diff(saved["cumulative"], prepend=0.0), shares, rtol=0, atol=1e-12)
    initial = [task["share"] for task in checkpoints.read_mixture(once)["tasks"].values()]
    assert shares != pytest.approx(initial, abs=1e-3)  # they moved
