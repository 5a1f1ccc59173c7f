"""Evaluation: seqio's `Evaluator` with predictions decoded by our model.

seqio does the bookkeeping (caching the eval examples with their indices, decoding tokens to text, the task's
postprocessor and metric functions); we only supply `predict_fn`, which batches the converted features and calls
`T5.generate`.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import gin
import numpy as np
import seqio
import tensorflow as tf
import torch

from mtplatform import cache, catalog, checkpoints, decoding, length_batches, prepack, scoring, stats, validation
from mtplatform import precision as precision_lib
from mtplatform.model import T5
from mtplatform.tf_setup import without_autotune

Generate = Callable[..., torch.Tensor]  # (encoder tokens, max_length=, num_beams=) -> generated ids, as T5.generate


def make_predict_fn(model: T5, batch_size: int, max_decode_length: int, num_beams: int = 1,
                    precision: str = "fp32", device: torch.device | str = "cpu", generate: Generate | None = None,
                    scorer: scoring.Scorer | None = None, compile_decoding: bool = False,
                    by_length: bool = True):
    """seqio `predict_fn`: (index, features) dataset -> [(index, generated token ids)]. `generate` replaces
    `model.generate` (a peer's decoder, timed against ours by benchmarks/eval_throughput.py). `scorer` is fed every
    batch too, with the encoder's output and cross-attention keys and values our decoding computed (a peer's
    decoder shares nothing: the scorer encodes the batch again). `compile_decoding`: decoding steps on a CPU run
    compiled (`decoding.compiled_step`). `by_length`: batches of similar input length, trimmed to their longest
    row (`length_batches`); else seqio's order and padding."""

    @torch.no_grad()
    def predict_fn(ds: tf.data.Dataset, *unused) -> list[tuple[int, list[int]]]:
        was_training = model.training
        model.eval()
        out: list[tuple[int, list[int]]] = []
        try:
            for indices, features in length_batches.batches(ds, batch_size, by_length):
                enc = torch.tensor(features["encoder_input_tokens"]).to(device)
                with precision_lib.autocast(precision, device):
                    tokens, memory, cross = _decode_batch(model, enc, max_decode_length, num_beams, generate,
                                                          compile_decoding)
                    if scorer is not None:
                        scorer.add(indices, features, memory, cross)
                # seqio stacks all predictions into one array: give every row the same length (0 = pad after EOS).
                tokens = torch.nn.functional.pad(tokens, (0, max_decode_length - tokens.shape[1]))
                out.extend(zip(indices.tolist(), tokens.cpu().tolist(), strict=True))
        finally:
            model.train(was_training)
        return out

    return predict_fn


def _decode_batch(model: T5, enc: torch.Tensor, max_length: int, num_beams: int, generate: Generate | None,
                  compile_steps: bool = False):
    """(generated ids, the encoder's output, its cross-attention keys and values): the last two None where a
    peer's `generate` decoded."""
    if generate is not None:
        return generate(enc, max_length=max_length, num_beams=num_beams), None, None
    memory = model.encode(enc)
    cross = model.cross_keys_values(memory)
    return (decoding.generate(model, enc, max_length, num_beams, memory=memory, cross=cross,
                              compile_steps=compile_steps), memory, cross)


@dataclass
class TaskEvaluation:
    """One task's evaluation: its metrics (the official ones, `target_nll`, and the label figures where the task has
    labels), and each metric's bootstrap replicates on `stats.resample_indices` of its examples."""

    metrics: dict[str, float]
    replicates: dict[str, np.ndarray]
    num_examples: int


def evaluate(model: T5, mixture_or_task_name: str, **settings) -> dict[str, dict[str, float]]:
    """Metrics per task ({task: {metric: value}}) for every task of a mixture that has metrics and the split
    (settings: `evaluate_tasks`'s)."""
    return {task: result.metrics
            for task, result in evaluate_tasks(model, mixture_or_task_name, replicates=False, **settings).items()}


@prepack.inference()  # the weights hold still during an evaluation: on CPUs its layers read packed copies
def evaluate_tasks(model: T5, mixture_or_task_name: str, *, split: str = "validation",
                   task_feature_lengths: Mapping[str, int] | None = None, num_examples: int | None = None,
                   batch_size: int = 32, max_decode_length: int = 64, num_beams: int = 1, precision: str = "fp32",
                   device: torch.device | str = "cpu", step: int | None = None,
                   generate: Generate | None = None, replicates: bool = True,
                   decode: bool = True, compile_decoding: bool = False,
                   by_length: bool = True) -> dict[str, TaskEvaluation]:
    """Every task of a mixture that has metrics and `split`: the official metrics of decoded predictions, the
    teacher-forced figures (`mtplatform.scoring`) and, with `replicates`, their bootstrap replicates (`generate`:
    see `make_predict_fn`). `decode=False` gives the teacher-forced figures alone, without decoding (what a
    mixture search's proxy runs are ranked on, at a fraction of the cost). `compile_decoding`, `by_length`: see
    `make_predict_fn`."""
    tasks = seqio.get_subtasks(seqio.get_mixture_or_task(mixture_or_task_name))
    scored = [t for t in tasks if t.metric_fns and split in t.splits]
    results = {}
    for task in scored:  # one evaluator per task: each reads its seqio cache, where it has one, or preprocesses
        evaluator, examples = _evaluator(task, split, task_feature_lengths, num_examples)
        texts = [ex["targets_pretokenized"].decode("utf-8") for ex in examples]
        vocab = task.output_features["targets"].vocabulary
        labels = _label_set(task, texts)
        label_ids = [vocab.encode(label) + [1] for label in labels] if labels else None
        gold = [labels.index(text) for text in texts] if labels else None
        decoded: dict[str, float] = {}
        targets = predictions = None
        if decode:  # the scorer rides along with decoding, sharing its encoder pass
            scorer = scoring.Scorer(model, label_ids, gold, device)
            predict_fn = make_predict_fn(model, batch_size, max_decode_length, num_beams, precision, device,
                                         generate, scorer, compile_decoding, by_length)
            future, outputs = evaluator.evaluate(compute_metrics=True, step=step, predict_fn=predict_fn)
            decoded = {k: _scalar(v) for k, v in future.result()[task.name].items()}
            targets = [_postprocessed(task, text, ex, True) for text, ex in zip(texts, examples, strict=True)]
            predictions = [_postprocessed(task, vocab.decode(list(tokens)), ex, False)
                           for tokens, ex in zip(outputs[task.name][_PREDICTION], examples, strict=True)]
            scores = scorer.result()
        else:
            scores = scoring.score(model, evaluator.cached_model_datasets[task.name], batch_size, label_ids, gold,
                                   precision, device, by_length)
        results[task.name] = TaskEvaluation(
            decoded | scores.metrics(), _replicates(task, targets, predictions, scores) if replicates else {},
            len(examples))
    return results


_PREDICTION = seqio.metrics.ModelOutputType.PREDICTION

# seqio evaluators kept for reuse, keyed by task and settings, while `reusing_evaluators` is in force.
_kept_evaluators: dict[tuple, tuple[seqio.Evaluator, list[dict]]] | None = None


@contextlib.contextmanager
def reusing_evaluators() -> Iterator[None]:
    """Within it, a task's seqio Evaluator and its examples are built once for a split, lengths and number of
    examples, and every later evaluation of the same reuses them, as t5x keeps one Evaluator per run.

    Why: building one traces the task's preprocessors in TensorFlow and reads and preprocesses its examples again,
    the same work for every checkpoint: a stage's evaluation in `mixing_strategies.gin` (7 tasks, 100 examples each,
    the mini model) took 6.6-7.5 s building them and 3.9-5.2 s reusing them. Only where the data cannot change in
    between: a training run, an experiment's stages, a stage process (`parallel_stages`)."""
    global _kept_evaluators
    outer = _kept_evaluators
    _kept_evaluators = {} if outer is None else outer
    try:
        yield
    finally:
        _kept_evaluators = outer


def _evaluator(task: seqio.Task, split: str, task_feature_lengths: Mapping[str, int] | None,
               num_examples: int | None) -> tuple[seqio.Evaluator, list[dict]]:
    """seqio's Evaluator of one task and its examples as numpy, reused where `reusing_evaluators` is in force."""
    lengths = tuple(sorted(task_feature_lengths.items())) if task_feature_lengths else None
    key = (task, split, lengths, num_examples)  # the task object itself: a task registered again is another
    if _kept_evaluators is not None and key in _kept_evaluators:
        return _kept_evaluators[key]
    cached = cache.where_cached(task)
    if cached is not None:
        print(f"mtp: {task.name}: reading its preprocessed {split} examples from seqio's cache {cached} "
              "(cache.use_cached = False preprocesses them instead)", file=sys.stderr)
    evaluator = seqio.Evaluator(
        mixture_or_task_name=task.name,
        feature_converter=seqio.EncDecFeatureConverter(pack=False),
        eval_split=split,
        use_cached=cached is not None,
        sequence_length=dict(task_feature_lengths) if task_feature_lengths else None,
        num_examples=num_examples,
        async_compute_metrics=False,
    )
    examples = list(without_autotune(evaluator.cached_task_datasets[task.name]).as_numpy_iterator())
    if _kept_evaluators is not None:
        _kept_evaluators[key] = (evaluator, examples)
    return evaluator, examples


def _postprocessed(task: seqio.Task, text: str, example: dict, is_target: bool):
    return task.postprocess_fn(text, example=example, is_target=is_target) if task.postprocess_fn else text


def _label_set(task: seqio.Task, targets: list[str]) -> tuple[str, ...] | None:
    """The task's registered labels, when every evaluated target text is one of them (else rank classification is
    undefined for the task, and it is said)."""
    labels = catalog.LABELS.get(task.name)
    if not labels:
        return None
    stray = next((text for text in targets if text not in labels), None)
    if stray is not None:
        print(f"mtp: task {task.name}: target {stray!r} is none of its labels {list(labels)}; label_accuracy and "
              "gold_label_logprob are not computed", file=sys.stderr)
        return None
    return labels


def _replicates(task: seqio.Task, targets: list | None, predictions: list | None,
                scores: scoring.Scores) -> dict[str, np.ndarray]:
    """Bootstrap replicates of every metric, on the resampled indices every arm of an experiment shares (the
    decoded metrics' only when `targets` and `predictions` are given)."""
    n = len(scores.tokens)
    if not n:
        return {}
    indices = stats.resample_indices(task.name, n)
    out = stats.replicates(task.metric_fns, targets, predictions, indices) if targets is not None else {}
    out["target_nll"] = stats.ratio_replicates(scores.nll_sum, scores.tokens, indices)
    if scores.label_logprobs is not None:
        out["label_accuracy"] = stats.mean_replicates(100.0 * scores.label_correct(), indices)
        out["gold_label_logprob"] = stats.mean_replicates(scores.gold_label_logprob(), indices)
    return out


def constant_baseline(task_name: str, split: str = "validation", max_train_examples: int = 20000,
                      num_examples: int | None = None) -> tuple[str, dict[str, float]]:
    """The majority-class (or most frequent target) baseline: (the constant prediction, its metrics on `split`,
    or on its first `num_examples` examples: the ones `evaluate` scores with the same setting).

    The constant is the most frequent target text among the first `max_train_examples` training examples; it is
    postprocessed and scored exactly as a model's prediction would be (the task's postprocess_fn and metric_fns).
    For a task with labels, `label_accuracy` is the share of examples whose label it is.
    """
    from collections import Counter

    task = seqio.get_mixture_or_task(task_name)
    counts = Counter(ex["targets"].decode("utf-8") for ex in catalog.pretokenized(task, "train", max_train_examples))
    constant = counts.most_common(1)[0][0]
    targets, predictions = [], []
    validation = task.get_dataset(None, split=split, shuffle=False, use_cached=False)
    examples = list((validation.take(num_examples) if num_examples else validation).as_numpy_iterator())
    for ex in examples:
        target = ex["targets_pretokenized"].decode("utf-8")
        targets.append(task.postprocess_fn(target, example=ex, is_target=True) if task.postprocess_fn else target)
        predictions.append(task.postprocess_fn(constant, example=ex, is_target=False)
                           if task.postprocess_fn else constant)
    metrics: dict[str, float] = {}
    for fn in task.metric_fns:
        metrics.update({k: _scalar(v) for k, v in fn(targets, predictions).items()})
    if constant in catalog.LABELS.get(task_name, ()):  # what rank classification scores for a constant predictor
        texts = [ex["targets_pretokenized"].decode("utf-8") for ex in examples]
        metrics["label_accuracy"] = 100.0 * sum(text == constant for text in texts) / len(texts)
    return constant, metrics


def _scalar(value) -> float:
    return float(getattr(value, "value", value))


def write_metrics(metrics: Mapping[str, Mapping[str, float]], path: Path) -> None:
    """metrics.json, whole or not at all (a temporary file renamed over it): a kill never leaves it cut."""
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoints.replace_text(path, json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def _device(quantize: str | None) -> torch.device:
    """Where an evaluation or inference runs: the GPU where there is one, the CPU for an int8 model."""
    return torch.device("cuda" if torch.cuda.is_available() and not quantize else "cpu")


def model_from(checkpoint_path: str | Path, quantize: str | None) -> tuple[T5, int, Path, torch.device]:
    """(model in eval mode, its step, its checkpoint directory, the device it runs on): the GPU where there is one,
    the CPU for an int8 model (`quantize`)."""
    from mtplatform import quantize as quantize_lib

    weights, step = checkpoints.verified_weights(checkpoint_path, "CHECKPOINT_PATH")
    device = _device(quantize)
    model = checkpoints.load_model(weights).to(device).eval()
    if quantize == "int8":
        model = quantize_lib.int8(model)
    return model, step, weights.parent, device


@gin.configurable
def evaluate_checkpoint(
    checkpoint_path: str = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] | None = None,
    split: str = "validation",
    output_dir: str | None = None,
    num_examples: int | None = None,
    batch_size: int = 32,
    max_decode_length: int = 64,
    num_beams: int = 1,
    precision: str = "auto",
    decode: bool = True,
    quantize: str | None = None,
    compile_decoding: bool = False,
) -> tuple[dict, Path]:
    """Evaluate a checkpoint; write `metrics.json`, the metrics' bootstrap replicates (`bootstrap.npz`) and
    TensorBoard scalars to `output_dir` (default: `<model dir>/eval_<split>`). Returns (metrics, metrics file).
    `decode=False`: the teacher-forced figures only (`evaluate_tasks`). `quantize="int8"`: the model's linear
    layers in int8 (`mtplatform.quantize`), on the CPU; metrics.json says so. `compile_decoding`: decoding steps
    on a CPU run compiled (`decoding.compiled_step`: a step in about three quarters of the time, after a compile
    of 15-30 s; for long decodes of many examples); metrics.json says so, as in bf16 its fused operations round
    differently, and a prediction can differ from eager decoding's where two tokens' logits nearly tie."""
    check_settings("evaluate_checkpoint", mixture_or_task_name, split, num_examples, batch_size, max_decode_length,
                   num_beams, task_feature_lengths, quantize=quantize, precision=precision,
                   compile_decoding=compile_decoding)
    model, step, ckpt, device = model_from(checkpoint_path, quantize)
    precision = _resolved_precision(model, precision, device)
    results = evaluate_tasks(model, mixture_or_task_name, split=split, task_feature_lengths=task_feature_lengths,
                             num_examples=num_examples, batch_size=batch_size, max_decode_length=max_decode_length,
                             num_beams=num_beams, precision=precision, device=device, step=step,
                             decode=decode, compile_decoding=compile_decoding)
    metrics = {task: result.metrics for task, result in results.items()}
    out = Path(output_dir) if output_dir else ckpt.parent / f"eval_{split}"
    write_metrics({"step": step, "checkpoint": str(ckpt), "metrics": metrics,
                   "num_examples": {task: result.num_examples for task, result in results.items()},
                   **({"quantize": quantize} if quantize else {}),
                   **({"compile_decoding": True} if compile_decoding else {})}, out / checkpoints.EVAL_METRICS)
    checkpoints.write_replicates({task: result.replicates for task, result in results.items()},
                                 out / checkpoints.REPLICATES)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out / "tensorboard")) as tb:
        for task, values in metrics.items():
            for k, v in values.items():
                tb.add_scalar(f"eval/{task}/{k}", v, step)
    return metrics, out / checkpoints.EVAL_METRICS


@gin.configurable
def infer(
    checkpoint_path: str = gin.REQUIRED,
    output_file: str = gin.REQUIRED,
    mixture_or_task_name: str | None = None,
    input_file: str | None = None,
    split: str = "validation",
    task_feature_lengths: Mapping[str, int] | None = None,
    num_examples: int | None = None,
    batch_size: int = 32,
    max_decode_length: int = 64,
    num_beams: int = 1,
    precision: str = "auto",
    quantize: str | None = None,
    compile_decoding: bool = False,
) -> Path:
    """Predictions as JSON lines {task, input, target, prediction}: for a task's (or mixture's) split, or for the
    lines of `input_file` (then tokenized with the first task's vocabulary when a task is named, else the
    configured one). `quantize="int8"`: the model's linear layers in int8, on the CPU. `compile_decoding`: as
    `evaluate_checkpoint`'s."""
    from tqdm import tqdm

    check_settings("infer", mixture_or_task_name, split, num_examples, batch_size, max_decode_length, num_beams,
                   task_feature_lengths, needs_split=not input_file, quantize=quantize, precision=precision,
                   compile_decoding=compile_decoding)
    model, _, _, device = model_from(checkpoint_path, quantize)
    precision = _resolved_precision(model, precision, device)
    rows: list[dict] = []
    for name, items in _inference_inputs(mixture_or_task_name, input_file, split, task_feature_lengths,
                                         num_examples):
        order = sorted(range(len(items)), key=lambda i: -len(items[i][1]))  # batched by length: `length_batches`
        predictions: dict[int, list[int]] = {}
        for start in tqdm(range(0, len(order), batch_size), desc=f"infer {name}", unit="batch"):
            chunk = order[start:start + batch_size]
            out = _decode([items[i][1] for i in chunk], model, max_decode_length, num_beams, precision, device,
                          compile_decoding)
            predictions.update(zip(chunk, out, strict=True))
        rows.extend({**row, "prediction": vocab.decode(predictions[i])} for i, (row, _, vocab) in enumerate(items))
    path = Path(output_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def _decode(inputs: list[list[int]], model: T5, max_decode_length: int, num_beams: int, precision: str,
            device: torch.device, compile_steps: bool = False) -> list[list[int]]:
    """Generated ids (EOS and the padding after it included) for a batch of tokenized inputs."""
    enc = _padded(inputs)
    with precision_lib.autocast(precision, device):
        return model.generate(enc.to(device), max_length=max_decode_length, num_beams=num_beams,
                              compile_steps=compile_steps).cpu().tolist()


def _padded(inputs: list[list[int]]) -> torch.Tensor:
    """Token ids as one (B, longest) tensor, padded with 0."""
    enc = torch.zeros(len(inputs), max(map(len, inputs)), dtype=torch.long)
    for i, ids in enumerate(inputs):
        enc[i, : len(ids)] = torch.tensor(ids)
    return enc


def _resolved_precision(model: T5, precision: str, device: torch.device) -> str:
    """`precision` resolved for `model` on `device`: fp32 for an int8 model, whose dynamic int8 layers take and give
    fp32 (under bf16 autocast, where `auto` would pick it, they would be handed bf16 and fail)."""
    from mtplatform import quantize as quantize_lib

    return "fp32" if quantize_lib.quantized_linears(model) else precision_lib.resolve(precision, device)


def decoding_speed(model: T5, task: str, num_examples: int = 128, batch_size: int = 32, positions: int = 32,
                   precision: str = "auto", device: torch.device | None = None, repeats: int = 3) -> float:
    """Greedy decoding's tokens per second, encoder included, on the first `num_examples` validation inputs of
    `task` with `positions` decoded for every row, EOS or not (a model that stops early is not thereby faster),
    best of `repeats` passes: what a model costs per generated token, comparable between models measured alike on
    one machine (the experiment's model table; benchmarks/ compare against a peer in the same run)."""
    device = device or next(model.parameters(), torch.empty(0)).device
    precision = _resolved_precision(model, precision, device)
    inputs = [ids for _, items in _inference_inputs(task, None, "validation", None, num_examples)
              for _, ids, _ in items]
    batches = [_padded(inputs[start:start + batch_size]).to(device) for start in range(0, len(inputs), batch_size)]
    best = math.inf
    for _ in range(repeats):
        began = time.perf_counter()
        with torch.no_grad(), precision_lib.autocast(precision, device):
            for enc in batches:
                decoding.generate(model, enc, max_length=positions, until_eos=False)
        best = min(best, time.perf_counter() - began)
    return len(inputs) * positions / best


InferenceInput = tuple[dict, list[int], seqio.Vocabulary]  # (row without its prediction, input ids, vocabulary)


def check_settings(where: str, mixture_or_task_name: str | None, split: str, num_examples: int | None,
                   batch_size: int, max_decode_length: int, num_beams: int,
                   task_feature_lengths: Mapping[str, int] | None, needs_split: bool = True,
                   quantize: str | None = None, precision: str = "auto", compile_decoding: bool = False) -> None:
    """`evaluate_checkpoint`'s or `infer`'s settings, checked before the model is loaded: one line naming the
    setting (`where`.<name>), its value and its range; a split no task of the mixture has is named with theirs."""
    from mtplatform import quantize as quantize_lib

    quantize_lib.check(f"{where}.quantize", quantize, precision)
    validation.positive_int(f"{where}.num_examples", num_examples, allow_none=True)
    validation.positive_int(f"{where}.batch_size", batch_size)
    validation.positive_int(f"{where}.max_decode_length", max_decode_length)
    validation.positive_int(f"{where}.num_beams", num_beams)
    if not isinstance(compile_decoding, bool):
        raise ValueError(f"{where}.compile_decoding = {compile_decoding!r}: must be True or False")
    if compile_decoding and _device(quantize).type == "cpu":  # a GPU replays CUDA graphs instead
        decoding.check_can_compile(f"{where}.compile_decoding")
    if task_feature_lengths is not None:
        validation.check_feature_lengths(task_feature_lengths)
    if mixture_or_task_name is None:
        return
    validation.name_setting("MIXTURE_OR_TASK_NAME", mixture_or_task_name)
    tasks = seqio.get_subtasks(seqio.get_mixture_or_task(mixture_or_task_name))
    splits = sorted({s for task in tasks for s in task.splits})
    if needs_split and split not in splits:
        raise ValueError(f"{where}.split = {split!r}: no task of {mixture_or_task_name} has it; its splits are "
                         f"{', '.join(splits)}")


def _input_lines(input_file: str) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank lines of `input_file`; invalid UTF-8 and a file without lines are errors
    naming the file (and the line)."""
    lines = []
    with open(input_file, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise ValueError(f"{input_file}:{number}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if line.strip():
                lines.append((number, line))
    if not lines:
        raise ValueError(f"INPUT_FILE {input_file} has no lines to run the model on")
    return lines


def _encode_lines(input_file: str, vocab: seqio.Vocabulary, max_in: int) -> list[InferenceInput]:
    """Each line tokenized and cut to `max_in` tokens (EOS included), as T5 truncates; the lines cut are reported."""
    rows, cut = [], []
    for number, text in _input_lines(input_file):
        ids = vocab.encode(text)
        if len(ids) > max_in - 1:
            cut.append(number)
        rows.append(({"input": text}, ids[: max_in - 1] + [1], vocab))
    if cut:
        print(f"mtp: {input_file}: {len(cut)} of {len(rows)} input line(s) cut to {max_in} tokens (the inputs "
              f"length; TASK_FEATURE_LENGTHS sets it), the first of them line {cut[0]}", file=sys.stderr)
    return rows


def _inference_inputs(mixture_or_task_name: str | None, input_file: str | None, split: str,
                      task_feature_lengths: Mapping[str, int] | None,
                      num_examples: int | None) -> list[tuple[str, list[InferenceInput]]]:
    """[(name, inputs)]: the lines of `input_file` (tokenized with the first task's vocabulary when a task is
    named, else the configured one), or each task's `split`; batches never mix two of them."""
    if input_file:
        vocab = (seqio.get_mixture_or_task(mixture_or_task_name).output_features["inputs"].vocabulary
                 if mixture_or_task_name else _configured_vocabulary())
        max_in = (task_feature_lengths or {}).get("inputs", 512)
        return [(Path(input_file).name, _encode_lines(input_file, vocab, max_in))]
    if not mixture_or_task_name:
        raise ValueError("infer needs MIXTURE_OR_TASK_NAME or INPUT_FILE")
    groups = []
    for task in seqio.get_subtasks(seqio.get_mixture_or_task(mixture_or_task_name)):
        if split not in task.splits:
            continue
        ds = task.get_dataset(task_feature_lengths, split=split, shuffle=False, use_cached=False)
        if num_examples:
            ds = ds.take(num_examples)
        vocab = task.output_features["targets"].vocabulary
        groups.append((task.name, [({"task": task.name,
                                     "input": e.get("inputs_pretokenized", b"").decode("utf-8"),
                                     "target": e.get("targets_pretokenized", b"").decode("utf-8")},
                                    e["inputs"].tolist(), vocab) for e in ds.as_numpy_iterator()]))
    return groups


def _configured_vocabulary() -> seqio.Vocabulary:
    from mtplatform.vocab import ConfiguredVocabulary

    return ConfiguredVocabulary()
