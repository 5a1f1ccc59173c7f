"""An experiment's report from what its runs wrote: results.json, results.md and plots. Trains nothing.

`mtp report EXPERIMENT_DIR` rebuilds it at any time (a partly finished experiment shows "-" where a stage has
not finished). Scores follow the T5 paper: a task's score is the mean of its metrics (MRPC's F1 and accuracy,
STS-B's two correlations; CoNLL's entity F1 alone), the reported figure is the best validation score over the
checkpoints evaluated, and the GLUE average is the mean of the GLUE tasks' scores. Every figure in the report
names the checkpoint and step it came from in results.json.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

SKIPPED_IN_SCORE = ("ner_precision", "ner_recall")


def score(metrics: dict[str, float]) -> float:
    """A task's single figure, as the T5 paper's tables give it. An undefined metric (the correlation of constant
    predictions, NaN) counts as 0: such predictions carry no linear relation to the targets."""
    values = [0.0 if math.isnan(v) else v for k, v in metrics.items() if k not in SKIPPED_IN_SCORE]
    return sum(values) / len(values) if values else float("nan")


def _stage_records(root: Path, seed: int) -> dict[str, dict]:
    records = {}
    for path in root.glob(f"*/seed_{seed}/stage.json"):
        record = json.loads(path.read_text())
        records[record["name"]] = record
    return records


def _task_results(record: dict, task: str) -> dict | None:
    """Best and last checkpoint's figures for `task` in one finished stage."""
    if not record.get("finished"):
        return None
    by_step = [(int(step), metrics[task]) for step, metrics in record["evaluations"].items() if task in metrics]
    if not by_step:
        return None
    by_step.sort()

    def entry(step: int, metrics: dict) -> dict:
        return {"score": score(metrics), "metrics": metrics, "step": step,
                "checkpoint": str(Path(record["model_dir"]) / f"checkpoint_{step}")}

    best = max(by_step, key=lambda item: score(item[1]))
    return {"best": entry(*best), "last": entry(*by_step[-1]), "stage": record["name"],
            "seed": record["config"]["seed"]}


def collect(root: Path) -> dict:
    """results.json's content: per arm and task, each seed's best and last figures, and their summary."""
    spec = json.loads((root / "experiment.json").read_text())
    baselines = json.loads((root / "baselines.json").read_text()) if (root / "baselines.json").is_file() else {}
    tasks = sorted({t for arm in spec["arms"] for stage in arm["stages"] for t in stage["evaluate"]})
    records = {seed: _stage_records(root, seed) for seed in spec["seeds"]}
    arms = []
    for arm in spec["arms"]:
        row = {"name": arm["name"], "mixture": arm.get("mixture"), "notes": arm.get("notes", {}), "tasks": {}}
        for task in tasks:
            stage = next((s["name"] for s in arm["stages"] if task in s["evaluate"]), None)
            per_seed = [r for seed in spec["seeds"]
                        if stage and (r := _task_results(records[seed].get(stage, {}), task))]
            scores = [r["best"]["score"] for r in per_seed]
            row["tasks"][task] = {"seeds": per_seed, "n": len(scores),
                                  "mean": statistics.fmean(scores) if scores else None,
                                  "std": statistics.stdev(scores) if len(scores) > 1 else None,
                                  "last_mean": statistics.fmean(r["last"]["score"] for r in per_seed)
                                  if per_seed else None}
        glue = [row["tasks"][t]["mean"] for t in tasks if t.startswith("glue_")]
        row["glue_average"] = statistics.fmean(glue) if glue and None not in glue else None
        row["shares"] = _shares(root, arm, spec["seeds"][0])
        arms.append(row)
    return {"title": spec["title"], "seeds": spec["seeds"], "eval_num_examples": spec.get("eval_num_examples"),
            "tasks": tasks, "arms": arms, "baselines": baselines, "seconds": _seconds(records)}


def _seconds(records: dict[int, dict[str, dict]]) -> dict | None:
    """Training and evaluation wall time summed over the stages that recorded it (stage.json's `seconds`)."""
    timed = [r["seconds"] for by_name in records.values() for r in by_name.values() if "seconds" in r]
    if not timed:
        return None
    return {"train": sum(t["train"] for t in timed), "eval": sum(t["eval"] for t in timed), "stages": len(timed),
            "of_stages": sum(len(by_name) for by_name in records.values())}


def _shares(root: Path, arm: dict, seed: int) -> dict | None:
    """Configured against trained-on shares of the arm's multi-task stage (the first that trained on its mixture)."""
    stage = next((s for s in arm["stages"] if s["train_on"] == arm.get("mixture")), None)
    if stage is None:
        return None
    model_dir = root / stage["name"] / f"seed_{seed}"
    if not (model_dir / "mixture.json").is_file() or not (model_dir / "metrics.jsonl").is_file():
        return None
    configured = json.loads((model_dir / "mixture.json").read_text())["tasks"]
    rows = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    seen = {t: rows[-1].get(f"task/{t}/examples", 0.0) for t in configured} if rows else {}
    total = sum(seen.values()) or 1.0
    return {t: {"configured": v["share"], "measured": seen.get(t, 0.0) / total} for t, v in configured.items()}


def _cell(entry: dict | None) -> str:
    if not entry or entry.get("mean") is None:
        return "-"
    text = f"{entry['mean']:.2f}"
    return text + (f" ± {entry['std']:.2f}" if entry.get("std") is not None else "")


def markdown(results: dict) -> str:
    tasks = results["tasks"]
    has_glue = any(t.startswith("glue_") for t in tasks)
    head = ["arm", "seeds", *tasks] + (["GLUE avg"] if has_glue else [])
    lines = [f"# {results['title']}", "",
             "Each figure is the best validation score over the checkpoints evaluated (as the T5 paper reports), "
             "mean ± standard deviation over seeds where there are several; results.json keeps every metric, "
             "the checkpoint and step each figure came from, and the last checkpoint's score beside it. A task's "
             "score is the mean of its metrics (CoNLL: entity F1; an undefined correlation, from constant "
             "predictions, counts as 0); the GLUE average is the mean over the GLUE tasks here. "
             + (f"Every arm and the baseline are scored on the same first {results['eval_num_examples']} "
                "validation examples of each task (all of them where a task has fewer)."
                if results.get("eval_num_examples") else "Scored on each task's whole validation split."), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in results["arms"]:
        n = max((arm["tasks"][t]["n"] for t in tasks), default=0)
        cells = [_cell(arm["tasks"][t]) for t in tasks]
        glue = [f"{arm['glue_average']:.2f}" if arm["glue_average"] is not None else "-"] if has_glue else []
        lines.append(f"| {arm['name']} | {n} | " + " | ".join(cells + glue) + " |")
    base = results["baselines"]
    if base:
        cells = [f"{score(base[t]['metrics']):.2f}" if t in base else "-" for t in tasks]
        glue_scores = [score(base[t]["metrics"]) for t in tasks if t.startswith("glue_") and t in base]
        glue = [f"{sum(glue_scores) / len(glue_scores):.2f}"] if has_glue and glue_scores else []
        lines.append("| majority class / constant prediction | - | " + " | ".join(cells + glue) + " |")
        lines += ["", "Constant predictions: " + "; ".join(f"`{t}`: {base[t]['prediction']!r}" for t in base)]
    for arm in results["arms"]:
        if arm.get("shares"):
            lines += ["", f"Mixture of **{arm['name']}** (`{arm['mixture']}`): configured share of examples -> "
                          "share trained on: " + ", ".join(f"{t} {v['configured']:.1%} -> {v['measured']:.1%}"
                                                          for t, v in arm["shares"].items())]
    if results.get("seconds"):
        t = results["seconds"]
        lines += ["", f"Wall time in {t['stages']} of {t['of_stages']} stages: training {t['train']:,.0f} s, "
                      f"evaluation {t['eval']:,.0f} s (each stage's last run; stage.json `seconds`)."]
    lines += ["", "Plots: `scores.png` (score per task and arm), `loss.png` (training loss per stage), "
                  "`task_losses.png` (per-task loss in multi-task stages), `shares.png` (configured against "
                  "trained-on mixture shares)."]
    return "\n".join(lines) + "\n"


def build(root: Path | str) -> dict:
    """Write results.json, results.md and the plots of the experiment in `root`; return the results."""
    root = Path(root)
    if not (root / "experiment.json").is_file():
        raise FileNotFoundError(f"{root}: no experiment.json; is this an EXPERIMENT_DIR that `mtp experiment` wrote?")
    results = collect(root)
    (root / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (root / "results.md").write_text(markdown(results))
    plots(root, results)
    return results


def plots(root: Path, results: dict) -> None:
    """scores.png, loss.png, task_losses.png and shares.png beside results.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks, arms = results["tasks"], results["arms"]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(tasks) * max(1, len(arms)) / 3), 4))
    width = 0.8 / max(1, len(arms))
    for i, arm in enumerate(arms):
        values = [arm["tasks"][t]["mean"] if arm["tasks"][t]["mean"] is not None else 0 for t in tasks]
        ax.bar(np.arange(len(tasks)) + i * width, values, width, label=arm["name"])
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks, rotation=30, ha="right")
    ax.set_ylabel("validation score")
    ax.legend(fontsize=7)
    _save(fig, root / "scores.png")

    spec = json.loads((root / "experiment.json").read_text())
    seed = spec["seeds"][0]
    fig, ax = plt.subplots(figsize=(8, 4))
    fig2, ax2 = plt.subplots(figsize=(8, 4))
    drawn = set()
    for i, arm in enumerate(spec["arms"]):
        for stage in arm["stages"]:
            rows = _metrics(root / stage["name"] / f"seed_{seed}")
            if not rows or stage["name"] in drawn:
                continue
            drawn.add(stage["name"])
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color=f"C{i % 10}", lw=1,
                    label=arm["name"] if stage is arm["stages"][0] else None)
            for key in sorted({k for r in rows for k in r if k.startswith("task/") and k.endswith("/loss")}):
                if stage["train_on"] == arm.get("mixture"):
                    points = [(r["step"], r[key]) for r in rows if key in r]
                    ax2.plot(*zip(*points, strict=True), lw=1, label=f"{arm['name']}: {key.split('/')[1]}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=7)
    ax2.set_xlabel("step")
    ax2.set_ylabel("per-task training loss")
    ax2.legend(fontsize=6, ncol=2)
    _save(fig, root / "loss.png")
    _save(fig2, root / "task_losses.png")

    with_shares = [arm for arm in arms if arm.get("shares")]
    fig, axes = plt.subplots(1, max(1, len(with_shares)), figsize=(4 * max(1, len(with_shares)), 4), squeeze=False)
    for ax, arm in zip(axes[0], with_shares, strict=False):
        names = list(arm["shares"])
        x = np.arange(len(names))
        ax.bar(x - 0.2, [arm["shares"][t]["configured"] for t in names], 0.4, label="configured")
        ax.bar(x + 0.2, [arm["shares"][t]["measured"] for t in names], 0.4, label="trained on")
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=7)
        ax.set_title(arm["name"], fontsize=8)
    axes[0][0].legend(fontsize=7)
    _save(fig, root / "shares.png")


def _metrics(model_dir: Path) -> list[dict]:
    path = model_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
