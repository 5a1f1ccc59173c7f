"""Distillation (`mtp distill`, `train.distillation`): the loss is its definition, the teacher stays frozen, a student
from the teacher's layers takes every other one, a run resumes bit for bit with each term logged, a student learns
the teacher's distribution on real data, and bad settings are one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import mtp, train_tiny

import tasks  # noqa: F401
from mtplatform import checkpoints, data, distill
from mtplatform import model as model_lib
from mtplatform import train as train_lib

TASK = "glue_sst2"
LENGTHS = {"inputs": 64, "targets": 8}
TIMINGS = ("tokens_per_second", "flops_per_second", "data_wait_fraction")
DEEP = ("T5Config.num_layers = 4", "T5Config.num_decoder_layers = 4")


def _train(model_dir: Path, steps: int, bindings: tuple[str, ...] = (), **overrides) -> dict:
    return train_tiny(model_dir, steps, TASK, LENGTHS, bindings, **{"batch_size": 8, **overrides})


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, vocab_file) -> Path:
    """A 4 + 4-layer tiny T5 trained on SST-2 for 24 steps (its checkpoint directory)."""
    path = tmp_path_factory.mktemp("distill") / "teacher"
    _train(path, 24, DEEP)
    return path


def _rows(model_dir: Path) -> dict[int, dict]:
    rows = {}
    for row in map(json.loads, checkpoints.metrics_file(model_dir).read_text().splitlines()):
        rows[row["step"]] = {k: v for k, v in row.items() if k not in TIMINGS}
    return rows


def _batch(n: int = 4) -> dict[str, torch.Tensor]:
    dataset, _ = data.train_dataset(mixture_or_task_name=TASK, task_feature_lengths=LENGTHS, batch_size=n, seed=0)
    return next(data.BatchIterator(dataset))


def test_soft_target_kl_is_its_definition():
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 3, 50), torch.randn(2, 3, 50)
    for temperature in (1.0, 2.0, 4.0):
        expected = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                            log_target=True, reduction="none").sum(-1)
        got = distill.soft_target_kl(teacher, student, temperature)
        assert torch.allclose(got, expected, atol=1e-6) and (got > 0).all()
    assert distill.soft_target_kl(teacher, teacher, 2.0).abs().max() < 1e-6
    # A higher temperature softens both distributions: their divergence shrinks (T^2 in the loss makes up for it).
    assert distill.soft_target_kl(teacher, student, 4.0).sum() < distill.soft_target_kl(teacher, student, 1.0).sum()


def test_the_loss_is_its_terms_and_the_teacher_stays_frozen(teacher):
    model, _ = train_lib.load_initial_weights(teacher, 0)
    student = model_lib.T5(model_lib.T5Config(**{**vars(model.cfg), "d_model": 32, "num_layers": 2,
                                                 "num_decoder_layers": 2}))
    config = distill.DistillConfig(teacher=str(teacher), alpha=0.3, beta=0.7, temperature=3.0, hidden=0.2)
    distiller = distill.Distiller(config, model, student)
    assert set(distiller.projections) == {"encoder", "decoder"}  # widths 32 and 64: a learned map per stack
    assert distiller.maps == {"encoder": [1, 3], "decoder": [1, 3]}  # TinyBERT's uniform mapping, 2 of 4 layers
    batch = _batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = distiller.token_losses(student.train(), batch, z_loss=0.0)
    cross_entropy, weights = student.eval().token_losses(batch)
    student.train()
    assert losses.cross_entropy.shape == losses.kl.shape == losses.hidden.shape == batch["decoder_target_tokens"].shape
    expected = 0.3 * losses.cross_entropy + 0.7 * 9.0 * losses.kl + 0.2 * losses.hidden
    assert torch.allclose(losses.total, expected)
    loss = losses.weighted_sum(weights)
    assert torch.allclose(loss, (losses.total * weights).sum() + 0.2 * losses.encoder_hidden * weights.sum())
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert not model.training  # eval mode: no dropout in the teacher's targets
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Dropout is 0.1 in this student: its training-mode cross-entropy is not the eval-mode one, but near it.
    assert not torch.equal(losses.cross_entropy, cross_entropy)


def test_a_student_from_the_teacher_layers_takes_every_other_one(teacher):
    model, _ = train_lib.load_initial_weights(teacher, 0)
    student = model_lib.T5(model_lib.T5Config(**{**vars(model.cfg), "num_layers": 2, "num_decoder_layers": 2}))
    distill.init_from_teacher(student, model)
    t, s = model.state_dict(), student.state_dict()
    for stack in ("encoder", "decoder"):
        for m, source in ((0, 0), (1, 2)):  # DistilBERT: one layer out of two
            names = [k for k in s if k.startswith(f"{stack}.{m}.")]
            assert names and all(torch.equal(s[k], t[k.replace(f"{stack}.{m}.", f"{stack}.{source}.", 1)])
                                 for k in names)
    outside = [k for k in s if not k.startswith(("encoder.", "decoder."))]
    assert "shared.weight" in outside and all(torch.equal(s[k], t[k]) for k in outside)
    wide = model_lib.T5(model_lib.T5Config(**{**vars(model.cfg), "d_ff": 96, "num_layers": 2}))
    with pytest.raises(ValueError, match=r"student_init = 'teacher_layers' needs the teacher's widths; the student "
                                         r"has d_ff 96 \(the teacher's 128\)"):
        distill.init_from_teacher(wide, model)


def test_distillation_resumes_bit_for_bit_and_logs_each_term(teacher, tmp_path):
    """A narrower student (d_model 32 against 64: hidden states through learned maps) with every term, stopped at
    step 4 and resumed to 8, logs what an uninterrupted run logs; its checkpoints carry the maps."""
    narrow = ("T5Config.d_model = 32",)
    config = distill.DistillConfig(teacher=str(teacher), hidden=0.1)
    _train(tmp_path / "once", 8, narrow, distillation=config)
    _train(tmp_path / "twice", 4, narrow, distillation=config)
    _train(tmp_path / "twice", 8, narrow, distillation=config)
    once, twice = _rows(tmp_path / "once"), _rows(tmp_path / "twice")
    assert sorted(once) == [3, 6, 8]
    assert once == {s: twice[s] for s in once}  # bit for bit, dropout on, the distillation terms included
    assert {"distill/cross_entropy", "distill/kl", "distill/hidden"} <= set(once[8])
    assert once[8]["distill/cross_entropy"] == pytest.approx(once[8]["task/glue_sst2/loss"])
    _, state = checkpoints.read_train_state(checkpoints.checkpoint_dir(tmp_path / "twice", 8))
    assert set(state["distiller"]) == {"encoder.weight", "decoder.weight"}
    assert state["distiller"]["encoder.weight"].shape == (64, 32)


@pytest.mark.slow  # 30 training steps of a student and 5 of another: the default suite's 15-minute budget
def test_a_student_learns_the_teacher_distribution(teacher, tmp_path):
    """Soft targets alone (alpha 0): the KL to the teacher falls as the student trains on SST-2, and a student that
    starts from the teacher's layers starts nearer the teacher than one from scratch."""
    half = ("T5Config.num_layers = 2", "T5Config.num_decoder_layers = 2", "T5Config.dropout_rate = 0.0")
    soft = distill.DistillConfig(teacher=str(teacher), alpha=0.0, beta=1.0, temperature=2.0)
    _train(tmp_path / "scratch", 30, half, distillation=soft, log_every=5)
    kl = [row["distill/kl"] for _, row in sorted(_rows(tmp_path / "scratch").items())]
    assert kl[-1] < 0.5 * kl[0], kl
    layers = distill.DistillConfig(teacher=str(teacher), alpha=0.0, beta=1.0, student_init="teacher_layers")
    _train(tmp_path / "layers", 5, half, distillation=layers, log_every=5)
    first = _rows(tmp_path / "layers")[5]["distill/kl"]
    assert first < kl[0], (first, kl[0])


@pytest.mark.slow  # two `mtp` processes, each starting TensorFlow: the default suite's 15-minute budget
def test_cli_distill(teacher, tmp_path):
    common = ["--gin_file=gin/models/tiny.gin", f"--gin.MIXTURE_OR_TASK_NAME='{TASK}'", "--gin.TRAIN_STEPS=4",
              "--gin.BATCH_SIZE=8", "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 8}",
              "--gin.train.precision='fp32'", "--gin.T5Config.num_layers=2", "--gin.T5Config.num_decoder_layers=2",
              "--gin.train.log_every=2"]
    out = mtp("distill", *common, "--gin_file=gin/runs/distill.gin", f"--gin.TEACHER='{teacher}'",
              f"--gin.MODEL_DIR='{tmp_path / 'student'}'", "--gin.distill.hidden=0.5",
              "--gin.distill.student_init='teacher_layers'")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"from every other layer of the teacher {teacher}" in out.stderr
    assert {"distill/cross_entropy", "distill/kl", "distill/hidden"} <= set(_rows(tmp_path / "student")[4])
    out = mtp("distill", *common, "--gin_file=gin/runs/pretrain.gin", f"--gin.MODEL_DIR='{tmp_path / 'bad'}'")
    assert out.returncode == 2 and out.stderr.strip() == ("mtp: error: mtp distill needs train.distillation = "
                                                          "@distill() and a TEACHER: include gin/runs/distill.gin")


def _other_vocabulary(teacher: Path, where: Path) -> Path:
    """The teacher's checkpoint with another vocabulary's fingerprint, as a run on another vocabulary saves it."""
    shutil.copytree(checkpoints.latest(teacher), where / checkpoints.latest(teacher).name)
    state_file = next(where.glob("checkpoint_*/train_state.pt"))
    state = torch.load(state_file, weights_only=False)
    state["vocabulary"] = {**state["vocabulary"], "sha256": "0" * 64}
    torch.save(state, state_file)
    return where


@pytest.mark.parametrize("settings, bindings, message", [
    ({"teacher": "/no/such/teacher"}, (), "distill.teacher=/no/such/teacher: no such checkpoint or model directory"),
    ({"teacher": "OTHER"}, (), "distill.teacher=.*other_vocab: it was trained with another vocabulary"),
    ({"hidden": 0.5, "hidden_projection": False}, ("T5Config.d_model = 32",),
     r"distill.hidden > 0 compares hidden states of width 32 \(student\) and 64 \(teacher\): set "
     "distill.hidden_projection = True"),
    ({"hidden": 0.5}, ("T5Config.num_layers = 6",),
     r"distill.hidden \(encoder\): the student has 6 layers in a stack, the teacher 4"),
    ({"student_init": "teacher_layers"}, ("T5Config.d_ff = 96",),
     r"student_init = 'teacher_layers' needs the teacher's widths; the student has d_ff 96"),
    ({"temperature": 0}, (), "distill.temperature"),
    ({"alpha": 0, "beta": 0}, (), "distill.alpha, distill.beta and distill.hidden are all 0"),
    ({"student_init": "every_other"}, (), "distill.student_init = 'every_other': must be one of"),
])
def test_bad_distillation_settings_are_one_line(teacher, tmp_path, settings, bindings, message):
    if settings.get("teacher") == "OTHER":
        settings = {"teacher": str(_other_vocabulary(teacher, tmp_path / "other_vocab"))}
    with pytest.raises(ValueError, match=message) as error:
        _train(tmp_path / "student", 2, bindings, distillation=distill.DistillConfig(**{"teacher": str(teacher),
                                                                                        **settings}))
    assert "\n" not in str(error.value).split("\n  In call to configurable")[0]  # gin's context: the CLI drops it
    assert not checkpoints.all_steps(tmp_path / "student")
