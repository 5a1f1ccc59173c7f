"""Training: exact resume, atomic checkpoints, the CLI commands, fine-tuning, evaluation, two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import seqio
from conftest import REPO, mtp, mtp_here, train_tiny

import tasks  # noqa: F401
from mtplatform import checkpoints, data

LENGTHS = {"inputs": 64, "targets": 16}
MIXTURE = "test_rte_and_span_corruption"

if MIXTURE not in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.add(MIXTURE, [("glue_rte", 1.0), ("span_corruption", 1.0)])


def _train(model_dir: Path, steps: int, dropout: float = 0.1, bindings: tuple[str, ...] = (), **overrides) -> dict:
    return train_tiny(model_dir, steps, MIXTURE, LENGTHS, bindings, dropout, **{"log_every": 1, **overrides})


def _losses(model_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (model_dir / "metrics.jsonl").read_text().splitlines())}


TIMINGS = ("tokens_per_second", "flops_per_second", "data_wait_fraction")  # differ between runs by nature


def _rows(model_dir: Path) -> dict[int, dict]:
    """metrics.jsonl by step, without the timing figures (which no two runs share)."""
    rows = {}
    for row in map(json.loads, (model_dir / "metrics.jsonl").read_text().splitlines()):
        rows[row["step"]] = {k: v for k, v in row.items() if k not in TIMINGS}
    return rows


def test_resume_gives_identical_losses(tmp_path, vocab_file):
    # Logging every 3 steps and saving every 4: the resumed run restarts inside a logging window.
    _train(tmp_path / "once", 8, log_every=3)
    _train(tmp_path / "twice", 4, log_every=3)
    assert checkpoints.all_steps(tmp_path / "twice") == [4]
    _train(tmp_path / "twice", 8, log_every=3)
    once, twice = _rows(tmp_path / "once"), _rows(tmp_path / "twice")
    assert sorted(once) == [3, 6, 8] and sorted(twice) == [3, 4, 6, 8]  # 4: where the first part ended
    assert once == {s: twice[s] for s in once}  # bit for bit, fp32, dropout on: the loss and every per-task figure
    assert once[8]["loss"] < once[3]["loss"]
    assert set(once[8]) >= {f"task/{t}/{k}" for t in ("glue_rte", "span_corruption")
                            for k in ("loss", "examples", "target_tokens")}


def test_resume_keeps_the_packing_it_was_saved_with(tmp_path, vocab_file):
    # A data position restores silently into a pipeline that packs differently; the checkpoint records its packing.
    _train(tmp_path / "run", 4, packing="seqio")
    data_dir = tmp_path / "run" / "checkpoint_4" / "data_rank0"
    assert json.loads((data_dir / data.PIPELINE_FILE).read_text()) == {"packing": "seqio", "autotune": False}
    with pytest.raises(ValueError, match=r"packed 'seqio', and this run packs 'first_fit'; resume it with "
                                         r"--gin.train.pack=True --gin.train.packing=\"'seqio'\"") as refused:
        _train(tmp_path / "run", 8)
    assert str(data_dir) in str(refused.value)
    with pytest.raises(ValueError, match=r"this run packs 'none'; resume it with --gin.train.pack=True"):
        _train(tmp_path / "run", 8, pack=False)
    _train(tmp_path / "run", 8, packing="seqio")
    assert checkpoints.all_steps(tmp_path / "run") == [4, 8]


def _position_saved_as_before(dataset, directory: Path, batches: int) -> list[dict]:
    """A data position as runs before pipeline.json wrote it (an autotuned iterator, no record of its pipeline)
    after `batches` batches; the three batches that follow it."""
    import tensorflow as tf

    before = iter(dataset)
    for _ in range(batches):
        next(before)
    tf.train.Checkpoint(iterator=before).write(str(directory / "iterator"))
    return [{k: v.numpy() for k, v in next(before).items()} for _ in range(3)]


def test_a_position_saved_before_packings_were_recorded_resumes_unpacked_or_seqio_packed(tmp_path, vocab_file):
    # Such positions came from seqio's packer or from unpacked rows: both resume; the first-fit packer refuses.
    # The check comes before the position is read, so one unpacked dataset serves every iterator here.
    dataset = data.train_dataset(mixture_or_task_name=MIXTURE, task_feature_lengths=LENGTHS, batch_size=4,
                                 pack=False)[0]
    expected = _position_saved_as_before(dataset, tmp_path / "legacy", 1)
    with pytest.raises(ValueError, match=r"saved before packings were recorded .* this run packs 'first_fit'; resume "
                                         r"it with .*'seqio'.* \(or --gin.train.pack=False if it was unpacked\)"):
        data.BatchIterator(dataset, packing="first_fit").restore(tmp_path / "legacy")
    resumed = data.BatchIterator(dataset, packing="none")
    resumed.restore(tmp_path / "legacy")
    assert all((a.numpy() == b).all() for a, b in zip(next(resumed).values(), expected[0].values(), strict=True))


def test_rates_are_resolved_once_and_read_back_on_resume(tmp_path, vocab_file, monkeypatch):
    """A UniMax run measures its budget when it begins and records it with the rates in mixture.json; resuming
    reads them back without measuring again, and refuses settings that would change them."""
    from mtplatform import mixing

    name = "test_train_unimax_rte_span"
    mixing.register(name, ["glue_rte", "span_corruption"], replace_existing=True, strategy="unimax", max_epochs=0.01)
    run = tmp_path / "run"
    _train(run, 4, mixture_or_task_name=name)
    recorded = checkpoints.read_mixture(run)
    assert recorded["settings"]["strategy"] == "unimax" and recorded["settings"]["budget_examples"] >= 4 * 4
    rates = mixing.Resolved.from_record(recorded).rates
    assert rates == {t: v["rate"] for t, v in recorded["tasks"].items()} and rates["glue_rte"] > 0

    def measured(*args, **kwargs):
        raise AssertionError("a resumed run measured UniMax's budget again")

    monkeypatch.setattr(data, "examples_per_row", measured)
    _train(run, 6, mixture_or_task_name=name)
    assert checkpoints.all_steps(run)[-1] == 6 and checkpoints.read_mixture(run) == recorded
    with pytest.raises(ValueError, match=r"mixture.json: test_train_unimax_rte_span's rates would change on resume "
                                         r"\(mixing.max_epochs = 2.0 now, 0.01 when it began\)"):
        _train(run, 8, mixture_or_task_name=name, bindings=("mixing.max_epochs = 2.0",))


def test_another_seed_gives_other_losses(tmp_path, vocab_file):
    _train(tmp_path / "seed0", 2)
    _train(tmp_path / "seed1", 2, seed=1)
    _train(tmp_path / "again", 2)
    assert _losses(tmp_path / "seed0") == _losses(tmp_path / "again")
    assert _losses(tmp_path / "seed0")[1] != _losses(tmp_path / "seed1")[1]


def test_bf16_training_repeats_exactly_and_stays_near_fp32(tmp_path, vocab_file):
    """`precision="auto"` is bf16 where the CPU multiplies bf16 natively and fp32 elsewhere (README, Precision).
    On one machine a bf16 run is as repeatable as an fp32 one (resume gives the same losses bit for bit); between
    the two kinds of machine the losses differ, within the tolerance below. The shape is tiny so that this also
    runs where bf16 is emulated."""
    # AdamW at a modest constant rate: a smooth trajectory, so that the comparison sees bf16's rounding and not a
    # chaotic optimizer amplifying it (Adafactor in warm-up on this tiny model moves the loss by 3% per ulp).
    smooth = ("make_optimizer.name = 'adamw'", "learning_rate.name = 'constant'", "learning_rate.base = 1e-3",
              "learning_rate.warmup_steps = 0")
    _train(tmp_path / "fp32", 6, dropout=0.0, bindings=smooth)
    _train(tmp_path / "bf16", 6, dropout=0.0, bindings=smooth, precision="bf16")
    _train(tmp_path / "bf16_resumed", 4, dropout=0.0, bindings=smooth, precision="bf16")
    _train(tmp_path / "bf16_resumed", 6, dropout=0.0, bindings=smooth, precision="bf16")
    fp32, bf16, resumed = (_losses(tmp_path / d) for d in ("fp32", "bf16", "bf16_resumed"))
    assert bf16 == resumed  # bit for bit on one machine
    # Step 1 is the same weights on the same batch: only bf16's rounding differs. bf16 keeps 8 significant bits
    # (relative rounding 2**-9 = 0.2% per operand); autocast keeps reductions, softmax, norms and the loss in fp32,
    # so errors average out over the sums: measured 3e-5 here. 1e-3 allows for other CPUs' bf16 kernels (AMX
    # accumulates in another order than the emulation) and still catches a wrong cast (percent-level).
    assert bf16[1] == pytest.approx(fp32[1], rel=1e-3)
    # Later steps add the drift of weights updated from bf16 gradients: at most 3e-4 here; 1% is the tolerance
    # the README states between a machine with native bf16 and one without.
    for step in fp32:
        assert bf16[step] == pytest.approx(fp32[step], rel=0.01), (step, fp32, bf16)


def test_keep_last_checkpoints_and_ignore_partial(tmp_path, vocab_file):
    model_dir = tmp_path / "run"
    _train(model_dir, 12, keep_checkpoints=2)
    assert checkpoints.all_steps(model_dir) == [8, 12]
    # A crash while writing leaves only a temporary directory: it is never read.
    partial = checkpoints.temporary_dir(model_dir, 16, "crashed-attempt")
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"truncated")
    assert checkpoints.latest(model_dir) == model_dir / "checkpoint_12"
    _train(model_dir, 16, keep_checkpoints=2)
    assert checkpoints.all_steps(model_dir) == [12, 16]
    assert not list(model_dir.glob(".tmp-*"))
    ckpt = model_dir / "checkpoint_16"
    assert {p.name for p in ckpt.iterdir()} >= {"model.safetensors", "train_state.pt", "data_rank0", "config.gin",
                                                 "meta.json"}


def test_saved_data_position_does_not_grow_with_steps(tmp_path, vocab_file):
    ds, _ = data.train_dataset(mixture_or_task_name=MIXTURE, task_feature_lengths=LENGTHS, batch_size=4)
    it = data.BatchIterator(ds)
    next(it)
    it.save(tmp_path / "early")
    for _ in range(60):
        next(it)
    it.save(tmp_path / "late")
    expected = [next(it) for _ in range(3)]
    size = {d: sum(f.stat().st_size for f in (tmp_path / d).iterdir()) for d in ("early", "late")}
    assert size["late"] < 1.5 * size["early"] + 4096  # a position, not a replay log
    again = data.BatchIterator(
        data.train_dataset(mixture_or_task_name=MIXTURE, task_feature_lengths=LENGTHS, batch_size=4)[0])
    again.restore(tmp_path / "late")
    for want in expected:
        got = next(again)
        assert all((got[k] == want[k]).all() for k in want)


def test_training_streams_run_without_the_autotuning_thread_and_resume_positions_saved_with_it(tmp_path, vocab_file):
    # Deleting an iterator waits for tf.data's autotuning thread, which can sleep through the wake-up for up to a
    # minute (`tf_setup.without_autotune`): the fixed pipeline's and every online task's iterator run without it.
    from mtplatform import mixing, online_stream

    def fresh():
        return data.train_dataset(mixture_or_task_name=MIXTURE, task_feature_lengths=LENGTHS, batch_size=4)[0]

    batches = data.BatchIterator(fresh(), packing="first_fit")
    assert batches._iterator._dataset.options().autotune.enabled is False
    next(batches)
    batches.save(tmp_path / "now")
    assert json.loads((tmp_path / "now" / data.PIPELINE_FILE).read_text())["autotune"] is False
    mixing.register("test_online_rte_span", ["glue_rte", "span_corruption"], replace_existing=True, strategy="online")
    stream = online_stream.OnlineStream(["glue_rte", "span_corruption"], "test_online_rte_span", LENGTHS, 4,
                                        pack=True, seed=0)
    assert [it._dataset.options().autotune.enabled for it in stream._fetcher._iterators] == [False, False]
    # A position saved before (its iterator autotuned, which changes the iterator's structure) resumes exactly:
    # into an autotuned iterator, which its next position records.
    expected = _position_saved_as_before(fresh(), tmp_path / "before", 5)
    (tmp_path / "before" / data.PIPELINE_FILE).write_text(json.dumps({"packing": "first_fit"}))
    resumed = data.BatchIterator(fresh(), packing="first_fit")
    resumed.restore(tmp_path / "before")
    for want in expected:
        got = next(resumed)
        assert all((got[k].numpy() == want[k]).all() for k in want)
    resumed.save(tmp_path / "after")
    assert json.loads((tmp_path / "after" / data.PIPELINE_FILE).read_text())["autotune"] is True
    (tmp_path / "after" / data.PIPELINE_FILE).write_text('{"packing": "first_fit", ')  # cut short
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'after' / data.PIPELINE_FILE}: not JSON \("):
        data.BatchIterator(fresh(), packing="first_fit").restore(tmp_path / "after")


def test_bad_batch_size_is_explained(tmp_path, vocab_file):
    with pytest.raises(ValueError, match="BATCH_SIZE=6 must be a multiple"):
        _train(tmp_path / "x", 2, batch_size=6, grad_accum_steps=4)


def test_grad_accumulation_matches_large_batch(tmp_path, vocab_file):
    # Same global batch of 4 from the same stream: one micro-batch of 4 or 2 x 2 gives the same per-token loss.
    _train(tmp_path / "full", 2, dropout=0.0)
    _train(tmp_path / "accum", 2, dropout=0.0, grad_accum_steps=2)
    full, accum = _losses(tmp_path / "full"), _losses(tmp_path / "accum")
    assert full[1] == pytest.approx(accum[1], rel=1e-5)


def _cli_train(command, model_dir, steps, *extra):
    run_file = "finetune" if command == "finetune" else "pretrain"
    return mtp(command, "--gin_file=gin/models/tiny.gin", f"--gin_file=gin/runs/{run_file}.gin",
               "--gin.MIXTURE_OR_TASK_NAME='glue_rte'", f"--gin.TRAIN_STEPS={steps}",
               f"--gin.MODEL_DIR='{model_dir}'",
               "--gin.BATCH_SIZE=8", "--gin.TASK_FEATURE_LENGTHS={'inputs': 128, 'targets': 8}",
               "--gin.train.checkpoint_every=20", "--gin.train.log_every=5", *extra)


@pytest.mark.slow  # seven `mtp` processes: about three minutes on 2 cores; CI's slow step runs it
def test_cli_train_resume_finetune_eval_infer(tmp_path, vocab_file):
    run = tmp_path / "pretrain"
    out = _cli_train("train", run, 20)
    assert out.returncode == 0, out.stderr[-3000:]
    assert checkpoints.all_steps(run) == [20] and (run / "metrics.jsonl").is_file()
    assert "TRAIN_STEPS = 20" in (run / "config.gin").read_text()
    for noise in ("cuInit", "WARNING:absl", "tensorflow/core"):  # TensorFlow's and absl's logs: only with --verbose
        assert noise not in out.stderr
    out = _cli_train("train", run, 40)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resuming from {run / 'checkpoint_20'}" in out.stderr
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20, 25, 30, 35, 40]

    ft = tmp_path / "finetune"
    out = _cli_train("finetune", ft, 60, f"--gin.INITIAL_CHECKPOINT_PATH='{run}'")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fine-tuning from" in out.stderr and "(step 40)" in out.stderr
    assert checkpoints.all_steps(ft) == [60]  # counted as t5x does: from 40 to 60
    assert [json.loads(x)["step"] for x in (ft / "metrics.jsonl").read_text().splitlines()] == [45, 50, 55, 60]

    out = mtp("eval", "--gin_file=gin/runs/eval.gin", f"--gin.CHECKPOINT_PATH='{ft}'",
              "--gin.MIXTURE_OR_TASK_NAME='glue_rte'", "--gin.evaluate_checkpoint.max_decode_length=4")
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((ft / "eval_validation" / "metrics.json").read_text())
    assert metrics["step"] == 60 and 0 <= metrics["metrics"]["glue_rte"]["accuracy"] <= 100
    assert "glue_rte: accuracy" in out.stdout

    preds = tmp_path / "preds.jsonl"
    out = mtp("infer", "--gin_file=gin/runs/infer.gin", f"--gin.CHECKPOINT_PATH='{ft}'",
              "--gin.MIXTURE_OR_TASK_NAME='glue_rte'", f"--gin.OUTPUT_FILE='{preds}'",
              "--gin.infer.num_examples=5", "--gin.infer.max_decode_length=4")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 5 and rows[0]["input"].startswith("rte sentence1: Dana Reeve")
    assert rows[0]["target"] == "not_entailment" and isinstance(rows[0]["prediction"], str)

    inputs = tmp_path / "inputs.txt"
    inputs.write_text("rte sentence1: The cat sat. sentence2: A cat sat.\n\nrte sentence1: It rains. sentence2: Dry.\n")
    out = mtp("infer", "--gin_file=gin/runs/infer.gin", f"--gin.CHECKPOINT_PATH='{ft}/checkpoint_60'",
              f"--gin.INPUT_FILE='{inputs}'", f"--gin.OUTPUT_FILE='{preds}'", "--gin.infer.max_decode_length=4",
              "--gin.infer.precision='fp32'")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r["input"] for r in rows] == ["rte sentence1: The cat sat. sentence2: A cat sat.",
                                          "rte sentence1: It rains. sentence2: Dry."]
    _check_export_round_trip(ft, tmp_path / "hf", vocab_file, rows)


def _check_export_round_trip(model_dir: Path, hf_dir: Path, vocab_file: Path, predictions: list[dict]) -> None:
    """`mtp export` writes a directory Hugging Face loads: the same ids from its tokenizer, the same logits and
    the same greedy predictions as `mtp infer` (fp32 on both sides)."""
    import torch
    from transformers import T5ForConditionalGeneration, T5Tokenizer

    from mtplatform.vocab import vocabulary_from_file

    out = mtp("export", f"--checkpoint={model_dir}", f"--output={hf_dir}", f"--vocab={vocab_file}")
    assert out.returncode == 0, out.stderr[-3000:]
    hf = T5ForConditionalGeneration.from_pretrained(hf_dir).eval()
    tokenizer = T5Tokenizer.from_pretrained(hf_dir, legacy=False)
    ours = vocabulary_from_file(vocab_file)
    for row in predictions:
        ids = tokenizer(row["input"]).input_ids
        assert ids == [*ours.encode(row["input"]), 1]  # our tokenizer's ids, EOS appended as the tasks do
        generated = hf.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, num_beams=1)
        assert tokenizer.decode(generated[0], skip_special_tokens=True) == row["prediction"]
    assert tokenizer.convert_ids_to_tokens(len(tokenizer) - 1) == "<extra_id_0>" == ours.decode([len(tokenizer) - 1])
    mine = checkpoints.load_model(checkpoints.latest(model_dir) / checkpoints.MODEL).eval()
    enc, dec = torch.tensor([ids]), torch.tensor([[0, *ids[:3]]])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=enc, decoder_input_ids=dec).logits, mine(enc, dec), atol=1e-4,
                                   rtol=0)


def test_cli_reports_missing_required_setting(tmp_path, vocab_file, capsys):
    code = mtp_here("train", "--gin_file=gin/models/tiny.gin", "--gin_file=gin/runs/pretrain.gin",
                    "--gin.MIXTURE_OR_TASK_NAME='glue_rte'", f"--gin.MODEL_DIR='{tmp_path}'")
    err = capsys.readouterr().err
    assert code == 2 and "TRAIN_STEPS" in err and "Traceback" not in err, err[-2000:]


def _torchrun(*args, port: int):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={port}", "-m", "mtplatform.cli", "train", *args],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


@pytest.mark.slow  # two torchrun processes on two cores: about two minutes; CI's slow step runs it
def test_two_processes_match_one(tmp_path, vocab_file):
    """torchrun with 2 CPU processes (gloo), each reading its own shard, against one process, same global batch;
    then FSDP on the same 2 processes, stopped and resumed, against DDP."""
    # A stable optimiser setting, so that the two curves differ only by the data each process reads.
    common = ["--gin_file=gin/models/tiny.gin", "--gin_file=gin/runs/pretrain.gin",
              "--gin.MIXTURE_OR_TASK_NAME='glue_sst2'", "--gin.TRAIN_STEPS=16", "--gin.BATCH_SIZE=16",
              "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 8}", "--gin.train.log_every=4",
              "--gin.train.checkpoint_every=8", "--gin.make_optimizer.name='adamw'",
              "--gin.learning_rate.name='constant'", "--gin.learning_rate.base=0.003",
              "--gin.learning_rate.warmup_steps=0",
              "--gin.train.precision='fp32'"]  # exactness tests run in fp32 on every machine (see README, Precision)
    one, two = tmp_path / "one", tmp_path / "two"
    out = mtp("train", *common, f"--gin.MODEL_DIR='{one}'")
    assert out.returncode == 0, out.stderr[-3000:]
    out = _torchrun(*common, f"--gin.MODEL_DIR='{two}'", port=29533)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 process(es)" in out.stderr
    assert checkpoints.all_steps(two) == [8, 16]
    assert {p.name for p in (two / "checkpoint_16").iterdir()} >= {"data_rank0", "data_rank1"}
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == [4, 8, 12, 16]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=0.1), (step, a, b)
    assert b[16] < 0.5 * b[4]

    # FSDP: the same processes, data and math as DDP with sharded parameters; 8 steps, stop, resume to 16.
    fsdp = tmp_path / "fsdp"
    half = [arg if not arg.startswith("--gin.TRAIN_STEPS") else "--gin.TRAIN_STEPS=8" for arg in common]
    out = _torchrun(*half, "--gin.train.fsdp=True", f"--gin.MODEL_DIR='{fsdp}'", port=29534)
    assert out.returncode == 0, out.stderr[-3000:]
    out = _torchrun(*common, "--gin.train.fsdp=True", f"--gin.MODEL_DIR='{fsdp}'", port=29535)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming from" in out.stderr
    c = _losses(fsdp)
    for step in b:
        assert c[step] == pytest.approx(b[step], rel=1e-4), (step, b, c)


def test_eval_during_training_logs_task_metrics(tmp_path, vocab_file):
    model_dir = tmp_path / "run"
    _train(model_dir, 4, eval_every=4, eval_num_examples=8, eval_max_decode_length=4)
    rows = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/glue_rte/accuracy" in r]
    assert len(evals) == 1 and evals[0]["step"] == 4 and 0 <= evals[0]["eval/glue_rte/accuracy"] <= 100
    assert (model_dir / "tensorboard").is_dir() and list((model_dir / "tensorboard").iterdir())


@pytest.mark.slow
def test_torch_compile_trains_as_eager(tmp_path, vocab_file, capfd):
    """`train.torch_compile` gives the losses of eager training (fp32) and reports its compile time. Slow: the
    first compile on a CPU takes about a minute; run by scripts/test.sh's slow step."""
    eager = _losses(_train_dir(tmp_path / "eager", 4))
    compiled = _losses(_train_dir(tmp_path / "compiled", 4, torch_compile=True))
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert "torch.compile: the first step took" in capfd.readouterr().err


def _train_dir(model_dir: Path, steps: int, **overrides) -> Path:
    _train(model_dir, steps, dropout=0.0, **overrides)
    return model_dir


def test_loss_takes_a_wrapper_without_truth_value():
    """A torch.compile'd module has no truth value (its __len__ delegates to the model); `loss` must not ask."""
    import torch

    from mtplatform import model as model_lib

    model = model_lib.T5(model_lib.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))

    class NoBool(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __len__(self):
            raise TypeError("object of type 'T5' has no len()")

        def forward(self, **batch):
            return self.inner(**batch)

    tokens = torch.tensor([[5, 6, 1]])
    batch = {"encoder_input_tokens": tokens, "decoder_input_tokens": torch.tensor([[0, 5, 6]]),
             "decoder_target_tokens": tokens}
    with torch.no_grad():
        assert float(model.loss(batch, forward=NoBool(model))[0]) == pytest.approx(float(model.loss(batch)[0]))
