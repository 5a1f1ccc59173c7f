"""Runs that nothing corrupts: SIGKILL at any moment, SIGTERM/SIGINT, divergence, two writers, unreadable
checkpoints, interrupted pruning. Each fault is real (a signal to a real `mtp train`, a truncated file on disk) or
injected at the exact point it would strike (a NaN in the loss or the weights), and every test checks what is left
on disk and that training goes on from it exactly."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import gin
import pytest
import torch
from conftest import mtp_here
from safetensors.torch import load_file

import tasks  # noqa: F401
from mtplatform import checkpoints, health, run_lock
from mtplatform import model as model_lib
from mtplatform import train as train_lib

REPO = Path(__file__).resolve().parents[1]
TASK = "glue_rte"
CLI_RUN = ("--gin_file=gin/models/tiny.gin", "--gin_file=gin/runs/pretrain.gin",
           f"--gin.MIXTURE_OR_TASK_NAME='{TASK}'", "--gin.BATCH_SIZE=4",
           "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 8}", "--gin.train.precision='fp32'",
           "--gin.T5Config.dropout_rate=0.1", "--gin.learning_rate.warmup_steps=10", "--gin.train.log_every=1",
           "--gin.train.checkpoint_every=1", "--gin.train.keep_checkpoints=2")


def _train(model_dir: Path, steps: int, **overrides) -> dict:
    gin.clear_config()
    gin.parse_config_files_and_bindings([str(REPO / "gin/models/tiny.gin")],
                                        ["make_optimizer.name = 'adafactor'", "learning_rate.warmup_steps = 10"])
    try:
        kwargs = dict(model_dir=str(model_dir), mixture_or_task_name=TASK, task_feature_lengths={"inputs": 64,
                      "targets": 8}, train_steps=steps, batch_size=4, checkpoint_every=1, log_every=1,
                      progress=False, precision="fp32")
        kwargs.update(overrides)
        return train_lib.train(**kwargs)
    finally:
        gin.clear_config()


def _rows(model_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


def _inject_nan_loss(monkeypatch, at_call: int, factor: float = float("nan")) -> None:
    """Multiply the token losses of the `at_call`-th forward pass (1-based) by `factor`."""
    original, calls = model_lib.T5.token_losses, [0]

    def token_losses(self, *args, **kwargs):
        calls[0] += 1
        out, extra = original(self, *args, **kwargs)
        return (out * factor if calls[0] == at_call else out), extra

    monkeypatch.setattr(model_lib.T5, "token_losses", token_losses)


# --- divergence --------------------------------------------------------------------------------------------------


def test_nan_loss_stops_before_the_update_and_is_never_saved(tmp_path, vocab_file, monkeypatch):
    _inject_nan_loss(monkeypatch, at_call=3)
    with pytest.raises(health.Diverged, match=r"training diverged at step 3 \(loss nan.*newest good checkpoint is "
                                              rf".*{tmp_path.name}/run/checkpoint_2"):
        _train(tmp_path / "run", 5)
    assert checkpoints.all_steps(tmp_path / "run") == [1, 2]
    monkeypatch.undo()
    _train(tmp_path / "run", 5)  # the rerun resumes from the good checkpoint and finishes
    assert checkpoints.all_steps(tmp_path / "run") == [3, 4, 5]
    assert [r["step"] for r in _rows(tmp_path / "run")] == [1, 2, 3, 4, 5]  # each step once
    assert all(torch.isfinite(t).all() for t in _weights(tmp_path / "run" / "checkpoint_5").values())


def test_nan_steps_can_be_skipped_up_to_a_limit(tmp_path, vocab_file, monkeypatch, capfd):
    _inject_nan_loss(monkeypatch, at_call=3)
    _train(tmp_path / "run", 5, max_nonfinite_skips=1)
    assert "step 3: loss nan" in capfd.readouterr().err
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():  # strict JSON: null, never NaN
        json.loads(line, parse_constant=lambda name: pytest.fail(f"metrics.jsonl holds {name}"))
    rows = {r["step"]: r for r in _rows(tmp_path / "run")}
    assert "loss" not in rows[3] and all("loss" in rows[s] for s in (1, 2, 4, 5))
    assert checkpoints.read_meta(tmp_path / "run" / "checkpoint_3")["healthy"] is False  # a skipped update
    assert checkpoints.read_meta(tmp_path / "run" / "checkpoint_4")["healthy"] is True


def test_nan_weights_are_never_checkpointed(tmp_path, vocab_file, monkeypatch):
    original = train_lib.train_step

    def poisoned(run, *args):
        out = original(run, *args)
        if run.step == 2:  # the update of step 3 made a weight NaN
            with torch.no_grad():
                run.model.encoder_norm.weight[0] = float("nan")
        return out

    monkeypatch.setattr(train_lib, "train_step", poisoned)
    with pytest.raises(health.Diverged, match="weight encoder_norm.weight holds non-finite values at step 3; no "
                                              "checkpoint was written"):
        _train(tmp_path / "run", 5)
    assert checkpoints.all_steps(tmp_path / "run") == [1, 2]
    assert not list((tmp_path / "run").glob(".tmp-*"))


def test_a_loss_spike_is_reported_and_pruning_keeps_the_newest_healthy_checkpoint(tmp_path, vocab_file,
                                                                                   monkeypatch, capfd):
    _inject_nan_loss(monkeypatch, at_call=30, factor=50.0)
    _train(tmp_path / "run", 30, keep_checkpoints=1)
    assert "mtp: loss spike at step 30" in capfd.readouterr().err
    assert checkpoints.all_steps(tmp_path / "run") == [29, 30]  # keep 1, and the newest healthy one
    assert checkpoints.read_meta(tmp_path / "run" / "checkpoint_30")["healthy"] is False


# --- one writer --------------------------------------------------------------------------------------------------


def test_a_second_writer_is_refused_and_a_dead_holder_is_taken_over(tmp_path, vocab_file, capfd):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from mtplatform import run_lock; "
         "held = run_lock.hold(Path(sys.argv[1])); held.__enter__(); print('held', flush=True); time.sleep(300)",
         str(model_dir)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(run_lock.ModelDirInUse, match=rf"being written by another run \(pid {holder.pid} on "):
            _train(model_dir, 2)
        assert checkpoints.all_steps(model_dir) == []
    finally:
        holder.kill()
        holder.wait()
    _train(model_dir, 2)  # the kernel released the dead holder's lock; its note is still in the file
    assert f"taking over {model_dir / '.lock'} from a run that did not release it (pid {holder.pid}" in \
        capfd.readouterr().err
    assert checkpoints.all_steps(model_dir) == [1, 2]
    assert (model_dir / ".lock").read_text() == ""  # released cleanly


# --- unreadable checkpoints and interrupted pruning ---------------------------------------------------------------


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, vocab_file, capfd):
    _train(tmp_path / "once", 6, checkpoint_every=2, keep_checkpoints=None)
    _train(tmp_path / "run", 4, checkpoint_every=2, keep_checkpoints=None)
    weights = tmp_path / "run" / "checkpoint_4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    _train(tmp_path / "run", 6, checkpoint_every=2, keep_checkpoints=None)
    err = capfd.readouterr().err
    assert "checkpoint_4 cannot be restored (model.safetensors has 1000 bytes" in err and "falling back" in err
    assert f"resuming from {tmp_path / 'run' / 'checkpoint_2'}" in err
    assert len(list((tmp_path / "run").glob("unreadable-checkpoint_4-*"))) == 1  # set aside, not deleted
    once, run = _weights(tmp_path / "once" / "checkpoint_6"), _weights(tmp_path / "run" / "checkpoint_6")
    assert all(torch.equal(once[k], run[k]) for k in once)
    assert [r["step"] for r in _rows(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("meta", ["[]", '{"files": {}}', '{"step": "2"}'])
def test_a_meta_json_without_a_step_is_unreadable_and_resume_falls_back(tmp_path, vocab_file, capfd, meta):
    _train(tmp_path / "run", 2, keep_checkpoints=None)
    (tmp_path / "run" / "checkpoint_2" / "meta.json").write_text(meta)
    assert "meta.json unreadable" in checkpoints.problem(tmp_path / "run" / "checkpoint_2")
    _train(tmp_path / "run", 3, keep_checkpoints=None)
    assert f"resuming from {tmp_path / 'run' / 'checkpoint_1'}" in capfd.readouterr().err
    assert checkpoints.all_steps(tmp_path / "run") == [1, 2, 3]


def test_a_run_whose_checkpoints_are_all_unreadable_stops_unless_told_to_start_over(tmp_path, vocab_file):
    _train(tmp_path / "run", 2, keep_checkpoints=None)
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    for step in (1, 2):
        (tmp_path / "run" / f"checkpoint_{step}" / "model.safetensors").write_bytes(b"cut")
    for _ in range(2):  # and again: nothing was set aside, so the second attempt finds the same
        with pytest.raises(ValueError, match=r"no checkpoint can be restored \(checkpoint_2: model.safetensors has 3 "
                                             r"bytes.*start_over_if_unreadable = True"):
            _train(tmp_path / "run", 3)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics  # nothing rewritten
    _train(tmp_path / "run", 3, start_over_if_unreadable=True)
    assert [r["step"] for r in _rows(tmp_path / "run")] == [1, 2, 3]
    assert len(list((tmp_path / "run").glob("unreadable-checkpoint_*"))) == 2  # set aside, not deleted


def test_resuming_with_another_vocabulary_is_refused_at_start(tmp_path, vocab_file, data_dir, monkeypatch):
    _train(tmp_path / "run", 1)
    from mtplatform.vocab import train_vocabulary

    lines = (data_dir / "glue" / "SST-2" / "train.tsv").read_text().splitlines()[1:3000]
    other = train_vocabulary((line.split("\t")[0] for line in lines), vocab_size=1000,
                             output=tmp_path / "other.model")
    monkeypatch.setenv("MTP_VOCAB", str(other))
    with pytest.raises(ValueError, match=r"the vocabulary \(MTP_VOCAB or vocab_path.path\) has 1,000 ids, sha256 "
                                         r"\w{12}; .*checkpoint_1 was trained with 4,000 ids"):
        _train(tmp_path / "run", 2)
    assert checkpoints.all_steps(tmp_path / "run") == [1]


def test_a_full_disk_removes_the_partial_checkpoint_and_names_the_path(tmp_path, vocab_file, monkeypatch):
    """ENOSPC injected where the weights are written (what a full disk does to safetensors' write)."""
    _train(tmp_path / "run", 1)
    original = checkpoints.save_model

    def full_disk(model, path, state=None):
        Path(path).write_bytes(b"x" * 1000)  # part of the file made it
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints, "save_model", full_disk)
    with pytest.raises(checkpoints.DiskFull, match=rf"no space left on the device of {tmp_path}/run/.tmp-checkpoint_2"
                                                   r".* writing the checkpoint of step 2; it needs about [\d.]+ MiB "
                                                   r".*removed the partial checkpoint, kept checkpoint_1"):
        _train(tmp_path / "run", 2)
    assert not list((tmp_path / "run").glob(".tmp-*")) and checkpoints.all_steps(tmp_path / "run") == [1]
    assert checkpoints.problem(tmp_path / "run" / "checkpoint_1") is None
    monkeypatch.setattr(checkpoints, "save_model", original)
    monkeypatch.setattr(Path, "write_text", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(checkpoints.DiskFull, match=rf"no space left on the device of {tmp_path}/run/config.gin"):
        _train(tmp_path / "run", 2)  # the rerun, the disk still full: named too, and config.gin left whole
    monkeypatch.undo()
    assert (tmp_path / "run" / "config.gin").read_text().strip()


def test_an_altered_checkpoint_fails_its_checksum(tmp_path, vocab_file):
    _train(tmp_path / "run", 1)
    state = tmp_path / "run" / "checkpoint_1" / "train_state.pt"
    data = bytearray(state.read_bytes())
    data[-10] ^= 0xFF
    state.write_bytes(bytes(data))
    assert checkpoints.problem(tmp_path / "run" / "checkpoint_1") == "train_state.pt does not match its checksum"
    os.remove(state)
    assert checkpoints.problem(tmp_path / "run" / "checkpoint_1") == "train_state.pt is missing"


def test_an_interrupted_prune_leaves_no_partial_checkpoint(tmp_path, vocab_file):
    _train(tmp_path / "run", 2, keep_checkpoints=1)
    # What a kill in the middle of deleting checkpoint_1 leaves: the renamed directory, half deleted.
    half = tmp_path / "run" / ".deleting-checkpoint_1"
    half.mkdir()
    (half / "train_state.pt").write_bytes(b"half")
    assert checkpoints.all_steps(tmp_path / "run") == [2] and checkpoints.latest_readable(tmp_path / "run")
    _train(tmp_path / "run", 3, keep_checkpoints=1)
    assert checkpoints.all_steps(tmp_path / "run") == [3] and not half.exists()


# --- signals and SIGKILL: real processes -----------------------------------------------------------------------


def _start(model_dir: Path, steps: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mtplatform.cli", "train", *CLI_RUN, f"--gin.TRAIN_STEPS={steps}",
                             f"--gin.MODEL_DIR='{model_dir}'", *extra], cwd=REPO, env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_training(model_dir: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (model_dir / "metrics.jsonl").is_file() or not (model_dir / "metrics.jsonl").read_text():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_signal_checkpoints_and_exits_with_its_code(tmp_path, vocab_file, sig):
    model_dir = tmp_path / "run"
    process = _start(model_dir, 100_000, "--gin.train.checkpoint_every=100000")
    _wait_for_training(model_dir, process)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + sig
    last = err.strip().splitlines()[-1]
    step = checkpoints.all_steps(model_dir)[-1]
    assert last == (f"mtp: stopped by {sig.name} at step {step}; wrote {model_dir / f'checkpoint_{step}'}; run the "
                    "same command again to resume")
    assert "Traceback" not in err and checkpoints.problem(model_dir / f"checkpoint_{step}") is None
    assert (model_dir / ".lock").read_text() == ""


def test_a_signal_during_set_up_exits_at_once_with_one_line(tmp_path, vocab_file):
    process = _start(tmp_path / "run", 5)
    time.sleep(2.0)  # loading TensorFlow, reading gin, building the pipeline: before any step
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)  # at once, not after set-up
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert err.strip().splitlines()[-1] == ("mtp: SIGTERM received outside a training step: exiting now (nothing "
                                            "is left half-written; a training run resumes from its last checkpoint)")
    assert checkpoints.all_steps(tmp_path / "run") == []


def test_an_error_line_starts_on_its_own_line_after_the_progress_bar(tmp_path, vocab_file, monkeypatch, capfd):
    _inject_nan_loss(monkeypatch, at_call=2)
    assert mtp_here("train", *CLI_RUN, "--gin.TRAIN_STEPS=4", f"--gin.MODEL_DIR='{tmp_path / 'run'}'") == 3
    lines = capfd.readouterr().err.rstrip("\n").split("\n")  # the bar redraws with \r: only \n ends a line
    assert lines[-1].startswith("mtp: error: training diverged at step 2"), lines[-3:]
    assert "train:" in lines[-2]  # the bar, closed on a line of its own


def _kill_and_resume(tmp_path: Path, kills: int, steps: int, seed: int, extra: tuple[str, ...] = ()) -> None:
    """SIGKILL a real run `kills` times, at moments drawn from start-up to mid-checkpoint, rerunning it after each;
    then the finished run must equal one that was never killed: weights, and every logged step once (its loss, and
    an online run's rates). `extra`: more command-line settings for both runs.

    The uninterrupted run goes first, and every wait is a multiple of its wall time (start-up included): a loaded
    machine slows both alike, so only a hang or a defect runs out of time."""
    reference = tmp_path / "reference"
    began = time.monotonic()
    process = _start(reference, steps, *extra)
    _, err = process.communicate(timeout=3600)
    assert process.returncode == 0, err[-3000:]
    uninterrupted = time.monotonic() - began
    rng = random.Random(seed)
    model_dir = tmp_path / "killed"
    for i in range(kills):
        before = checkpoints.all_steps(model_dir)
        process = _start(model_dir, steps, *extra)
        if i % 3 == 1:
            time.sleep(rng.uniform(0.0, 12.0))  # anywhere, start-up included
        else:  # just after a new checkpoint: inside the next step, or writing or pruning the next checkpoint
            _wait_for_training(model_dir, process, timeout=5 * uninterrupted)
            deadline = time.monotonic() + 5 * uninterrupted
            while checkpoints.all_steps(model_dir) == before and process.poll() is None:
                assert time.monotonic() < deadline, "no new checkpoint"
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.3))
        process.kill()
        process.wait()
    process = _start(model_dir, steps, *extra)
    _, err = process.communicate(timeout=10 * uninterrupted)
    assert process.returncode == 0, err[-3000:]

    want, got = _weights(reference / f"checkpoint_{steps}"), _weights(model_dir / f"checkpoint_{steps}")
    assert all(torch.equal(want[k], got[k]) for k in want)
    rows = _rows(model_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in _rows(reference)]
    rates = [{k: v for k, v in r.items() if k.startswith("rate/")} for r in rows]
    assert rates == [{k: v for k, v in r.items() if k.startswith("rate/")} for r in _rows(reference)]
    assert not list(model_dir.glob(".tmp-*")) and not list(model_dir.glob(".deleting-*"))


@pytest.mark.slow  # the default suite's budget; test_sigkill_many_times_resumes_exactly (slow) kills 21 times
def test_sigkill_at_random_moments_resumes_exactly(tmp_path, vocab_file):
    _kill_and_resume(tmp_path, kills=2, steps=24, seed=0)


ONLINE = ("--gin.MIXTURE_OR_TASK_NAME='test_faults_online'",
          "--gin.mixtures.declared={'test_faults_online': {'tasks': ['glue_rte', 'glue_cola', 'glue_sst2'], "
          "'strategy': 'online', 'online': {'algorithm': 'odm'}}}")


@pytest.mark.slow  # the default suite resumes online runs in process (tests/test_online_mixing.py)
def test_sigterm_mid_run_resumes_an_online_run_exactly(tmp_path, vocab_file):
    """SIGTERM saves at the step it lands in, between two regular checkpoints; resumed, the online run equals one
    never stopped: weights, losses and rates of every step."""
    steps, every = 24, "--gin.train.checkpoint_every=10"
    process = _start(tmp_path / "reference", steps, every, *ONLINE)
    _, err = process.communicate(timeout=3600)
    assert process.returncode == 0, err[-3000:]
    model_dir = tmp_path / "stopped"
    process = _start(model_dir, steps, every, *ONLINE)
    _wait_for_training(model_dir, process, timeout=600)
    while len(_rows(model_dir)) < 12 and process.poll() is None:  # past the checkpoint at step 10
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    stopped_at = checkpoints.all_steps(model_dir)[-1]
    assert stopped_at not in (10, 20, steps), stopped_at  # saved by the signal, not by checkpoint_every
    process = _start(model_dir, steps, every, *ONLINE)
    _, err = process.communicate(timeout=3600)
    assert process.returncode == 0, err[-3000:]
    want, got = _weights(tmp_path / "reference" / f"checkpoint_{steps}"), _weights(model_dir / f"checkpoint_{steps}")
    assert all(torch.equal(want[k], got[k]) for k in want)
    rows, reference = _rows(model_dir), _rows(tmp_path / "reference")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for key in ("loss", *(k for k in reference[0] if k.startswith("rate/"))):
        assert [r[key] for r in rows] == [r[key] for r in reference], key


@pytest.mark.slow  # the default suite resumes online runs in process (tests/test_online_mixing.py)
def test_sigkill_resumes_an_online_run_exactly(tmp_path, vocab_file):
    """Online mixing (shares moved every step by the losses): the same rates, losses and weights after kills."""
    _kill_and_resume(tmp_path, kills=2, steps=24, seed=2, extra=ONLINE)
    rows = _rows(tmp_path / "killed")
    assert rows[0]["rate/glue_rte"] != rows[-1]["rate/glue_rte"]  # the shares did move


@pytest.mark.slow
def test_sigkill_many_times_resumes_exactly(tmp_path, vocab_file):
    """The slow version (scripts/test.sh runs it as its own step): 21 kills over a 120-step run."""
    _kill_and_resume(tmp_path, kills=21, steps=120, seed=1)
