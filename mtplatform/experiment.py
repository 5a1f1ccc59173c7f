"""`mtp experiment`: multi-task pretraining, then fine-tuning on each task from that checkpoint, then evaluation;
one row per task in `results.md` and `results.json`.

Each stage is a `train` call under a gin scope (`pretrain/...`, `finetune/...`), so one gin file configures the
stages differently (e.g. `finetune/learning_rate.name = "constant"`). Stages that already finished are resumed
(which is immediate), so re-running an interrupted experiment continues where it stopped.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import gin
import torch

from mtplatform import checkpoints, evaluate
from mtplatform import model as model_lib
from mtplatform import train as train_lib


@gin.configurable
def experiment(
    experiment_dir: str = gin.REQUIRED,
    pretrain_mixture: str = gin.REQUIRED,
    finetune_tasks: Sequence[str] = gin.REQUIRED,
    pretrain_steps: int = gin.REQUIRED,
    finetune_steps: int = gin.REQUIRED,
    eval_split: str = "validation",
    eval_num_examples: int | None = None,
    eval_max_decode_length: int = 32,
) -> dict:
    """Run the pipeline; return {"pretrain": {...}, "tasks": {task: {"metrics": ..., "model_dir": ...}}}."""
    root = Path(experiment_dir)
    root.mkdir(parents=True, exist_ok=True)
    pretrain_dir = root / "pretrain"
    with gin.config_scope("pretrain"):
        pre = train_lib.train(model_dir=str(pretrain_dir), mixture_or_task_name=pretrain_mixture,
                              train_steps=pretrain_steps)
    print(f"experiment: pretrained {pretrain_mixture} to step {pre['step']} in {pretrain_dir}", file=sys.stderr)
    results: dict = {
        "experiment_dir": str(root),
        "pretrain": {"mixture": pretrain_mixture, "model_dir": str(pretrain_dir), "steps": pretrain_steps,
                     "shares": mixture_shares(pretrain_dir), **_first_last_loss(pretrain_dir)},
        "tasks": {},
    }
    for task in finetune_tasks:
        task_dir = root / f"finetune_{task}"
        with gin.config_scope("finetune"):
            train_lib.train(model_dir=str(task_dir), mixture_or_task_name=task,
                            train_steps=pretrain_steps + finetune_steps,  # t5x counting: steps continue
                            initial_checkpoint_path=str(pretrain_dir), finetune=True)
        ckpt = checkpoints.latest(task_dir)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = model_lib.load(ckpt / "model.safetensors").to(device).eval()
        metrics = evaluate.evaluate(model, task, split=eval_split, num_examples=eval_num_examples,
                                    max_decode_length=eval_max_decode_length,
                                    device=device, step=pretrain_steps + finetune_steps)
        results["tasks"][task] = {"metrics": metrics.get(task, {}), "model_dir": str(task_dir),
                                  **_first_last_loss(task_dir)}
        print(f"experiment: {task}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.get(task, {}).items()),
              file=sys.stderr)
    (root / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (root / "results.md").write_text(results_markdown(results))
    return results


def _first_last_loss(model_dir: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]
    return {"first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"]} if rows else {}


def mixture_shares(model_dir: Path) -> dict[str, dict[str, float]]:
    """Per task of a run: the configured share of examples (mixture.json) and the share it trained on (the
    cumulative per-task example counts of its last metrics.jsonl row)."""
    report = json.loads((model_dir / "mixture.json").read_text())
    rows = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    seen = {t: rows[-1].get(f"task/{t}/examples", 0.0) for t in report["tasks"]} if rows else {}
    total = sum(seen.values()) or 1.0
    return {t: {"configured": v["share"], "measured": seen.get(t, 0.0) / total, "examples": seen.get(t, 0.0)}
            for t, v in report["tasks"].items()}


def results_markdown(results: dict) -> str:
    pre = results["pretrain"]
    lines = [
        "# Experiment results",
        "",
        f"Pretraining on `{pre['mixture']}` for {pre['steps']} steps: loss {pre.get('first_loss', float('nan')):.3f}"
        f" -> {pre.get('last_loss', float('nan')):.3f}.",
        "",
        "| task in the pretraining mixture | configured share | share trained on (examples) |",
        "|---|---:|---:|",
        *(f"| `{t}` | {v['configured']:.1%} | {v['measured']:.1%} ({v['examples']:,.0f}) |"
          for t, v in pre.get("shares", {}).items()),
        "",
        "| task | metrics | fine-tuning loss (first -> last) |",
        "|---|---|---|",
    ]
    for task, row in results["tasks"].items():
        metrics = ", ".join(f"{k} {v:.2f}" for k, v in row["metrics"].items()) or "-"
        lines.append(f"| `{task}` | {metrics} | {row.get('first_loss', float('nan')):.3f} -> "
                     f"{row.get('last_loss', float('nan')):.3f} |")
    return "\n".join(lines) + "\n"
