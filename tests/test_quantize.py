"""int8 inference (`mtp eval/infer --quantize=int8`): PyTorch's dynamic quantization of the linear layers, scored as
usual on real data, close to fp32, smaller on disk."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import mtp_here

import tasks  # noqa: F401  (registers the tasks)
from mtplatform import checkpoints, evaluate, quantize
from mtplatform import model as model_lib
from mtplatform.train import vocab_size_for


def _checkpoint(model_dir, task: str) -> model_lib.T5:
    """A seeded model of `task`'s vocabulary, written as training writes a checkpoint (weights, meta.json)."""
    torch.manual_seed(0)
    model = model_lib.T5(model_lib.T5Config(vocab_size=vocab_size_for(task), d_model=128, d_kv=32, d_ff=256,
                                            num_layers=2, num_heads=4)).eval()
    directory = checkpoints.checkpoint_dir(model_dir, 1)
    directory.mkdir(parents=True)
    checkpoints.save_model(model, directory / checkpoints.MODEL)
    checkpoints.write_meta(directory, 1, 1, None, True)
    return model


def test_int8_quantizes_every_linear_layer_and_shrinks_the_weights():
    torch.manual_seed(0)
    model = model_lib.T5(model_lib.T5Config(vocab_size=512, d_model=128, d_kv=32, d_ff=256, num_layers=2,
                                            num_heads=4, tie_word_embeddings=False)).eval()
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    fp32_bytes = quantize.state_bytes(model)
    int8 = quantize.int8(model)
    assert linears > 0 and quantize.quantized_linears(int8) == linears
    assert quantize.state_bytes(int8) < 0.6 * fp32_bytes  # the embedding stays fp32
    with pytest.raises(ValueError, match="run on the CPU, and the model is on meta"):
        quantize.int8(model_lib.T5(model_lib.T5Config(vocab_size=512, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                      num_heads=4)).to("meta"))


def test_an_int8_evaluation_scores_a_checkpoint_as_fp32_does_within_a_percent(tmp_path, vocab_file):
    """On MRPC's first 64 validation pairs: target NLL within 1% of fp32's, the same label figures' scale, the same
    greedy predictions on nearly every example; metrics.json says it was int8."""
    _checkpoint(tmp_path / "run", "glue_mrpc")
    results = {}
    for name, setting in (("fp32", None), ("int8", "int8")):
        metrics, path = evaluate.evaluate_checkpoint(
            checkpoint_path=str(tmp_path / "run"), mixture_or_task_name="glue_mrpc", num_examples=64,
            max_decode_length=4, output_dir=str(tmp_path / name), quantize=setting, precision="auto")
        results[name] = (metrics["glue_mrpc"], json.loads(path.read_text()))
    (fp32, fp32_record), (int8, int8_record) = results["fp32"], results["int8"]
    assert int8_record["quantize"] == "int8" and "quantize" not in fp32_record
    assert int8["target_nll"] == pytest.approx(fp32["target_nll"], rel=0.01)
    assert int8["target_nll"] != fp32["target_nll"]  # it did run in int8
    assert int8["gold_label_logprob"] == pytest.approx(fp32["gold_label_logprob"], rel=0.05, abs=0.05)
    assert abs(int8["accuracy"] - fp32["accuracy"]) <= 100 * 4 / 64


def test_cli_eval_and_infer_take_quantize(tmp_path, vocab_file, capfd):
    _checkpoint(tmp_path / "run", "glue_rte")
    code = mtp_here("eval", "--gin_file=gin/runs/eval.gin", "--quantize=int8",
                    f"--gin.CHECKPOINT_PATH='{tmp_path / 'run'}'", "--gin.MIXTURE_OR_TASK_NAME='glue_rte'",
                    "--gin.evaluate_checkpoint.num_examples=8", "--gin.evaluate_checkpoint.max_decode_length=4")
    assert code == 0, capfd.readouterr().err[-2000:]
    record = json.loads((tmp_path / "run" / "eval_validation" / "metrics.json").read_text())
    assert record["quantize"] == "int8" and record["num_examples"] == {"glue_rte": 8}
    code = mtp_here("infer", "--gin_file=gin/runs/infer.gin", "--quantize=int8",
                    f"--gin.CHECKPOINT_PATH='{tmp_path / 'run'}'", "--gin.MIXTURE_OR_TASK_NAME='glue_rte'",
                    f"--gin.OUTPUT_FILE='{tmp_path / 'p.jsonl'}'", "--gin.infer.num_examples=3",
                    "--gin.infer.max_decode_length=4")
    assert code == 0, capfd.readouterr().err[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all("prediction" in row for row in rows)


def test_an_int8_model_decodes_in_fp32_where_auto_picks_bf16(tmp_path, vocab_file, monkeypatch):
    """Where bf16 is native `precision="auto"` is bf16, but an int8 model's layers take and give fp32: evaluation,
    inference and the experiments' decoding speed run it in fp32 (under bf16 autocast it would fail)."""
    from mtplatform import precision

    monkeypatch.setenv(precision.NATIVE_BF16_ENV, "native")
    _checkpoint(tmp_path / "run", "glue_rte")
    model, _, _, device = evaluate.model_from(str(tmp_path / "run"), "int8")
    assert precision.resolve("auto", device) == "bf16"
    assert evaluate._resolved_precision(model, "auto", device) == "fp32"
    assert evaluate.decoding_speed(model, "glue_rte", num_examples=4, batch_size=4, positions=2, repeats=1) > 0
