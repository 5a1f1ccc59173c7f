"""An experiment's report from what its runs wrote: results.json, results.md and plots. Trains nothing.

`mtp report EXPERIMENT_DIR` rebuilds it at any time (a partly finished experiment shows "-" where a stage has
not finished). A task's score follows the T5 paper (the mean of its metrics: MRPC's F1 and accuracy, STS-B's two
correlations; CoNLL's entity F1 alone), and the GLUE average is the mean of the GLUE tasks' scores. Beside it:
`target_nll`, `label_accuracy` and `gold_label_logprob` (`mtplatform.scoring`), which move at budgets where decoded
scores sit at the constant baseline. Every figure is the stage's last checkpoint's, never the best of several
checkpoints scored on the same examples (that selection favours stages evaluated more often); results.json keeps
every evaluated checkpoint's score as a learning curve, each figure's checkpoint and step, a 95% bootstrap interval
(`ci95`, over examples and over seeds where there are several), a paired bootstrap p-value against the best arm
(`p_value`), and Kendall's tau between the seeds' rankings of the arms (`mtplatform.stats`).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np

from mtplatform import checkpoints, stats

SKIPPED_IN_SCORE = ("ner_precision", "ner_recall")
TEACHER_FORCED = ("target_nll", "label_accuracy", "gold_label_logprob")
LOWER_IS_BETTER = ("target_nll",)
FIGURE_NAMES = {"score": "score", "target_nll": "target NLL (nats per token)", "label_accuracy": "label accuracy",
                "gold_label_logprob": "gold label log-probability"}


def score(metrics: dict[str, float]) -> float:
    """A task's single figure, as the T5 paper's tables give it: the mean of its official metrics. An undefined
    metric (the correlation of constant predictions, NaN) counts as 0: such predictions carry no linear relation
    to the targets."""
    values = [0.0 if math.isnan(v) else v for k, v in metrics.items() if _in_score(k)]
    return sum(values) / len(values) if values else float("nan")


def _in_score(metric: str) -> bool:
    return metric not in SKIPPED_IN_SCORE and metric not in TEACHER_FORCED


def _score_replicates(replicates: dict[str, np.ndarray]) -> np.ndarray | None:
    """`score` of each resample: the same mean of the official metrics, replicate by replicate."""
    official = [np.nan_to_num(v, nan=0.0) for k, v in replicates.items() if _in_score(k)]
    return np.mean(official, axis=0) if official else None


def _stage_records(root: Path, seed: int) -> dict[str, dict]:
    records = {}
    for path in root.glob(f"*/seed_{seed}/stage.json"):
        record = json.loads(path.read_text())
        record["_dir"] = str(path.parent)  # where its evaluations are now (model_dir is where it ran)
        records[record["name"]] = record
    return records


def _task_results(record: dict, task: str) -> dict | None:
    """One finished stage's figures for `task`: the last checkpoint's, every checkpoint's as a curve, and the last
    one's bootstrap replicates (kept out of results.json)."""
    if not record.get("finished"):
        return None
    by_step = sorted((int(step), metrics[task]) for step, metrics in record["evaluations"].items() if task in metrics)
    if not by_step:
        return None
    step, metrics = by_step[-1]
    stage_dir = Path(record["model_dir"])
    replicates = checkpoints.read_replicates(
        checkpoints.stage_eval_dir(record.get("_dir", stage_dir), step, task) / checkpoints.REPLICATES, task)
    if replicates:
        replicates["score"] = _score_replicates(replicates)
    figures = {"score": score(metrics), **{k: metrics[k] for k in TEACHER_FORCED if k in metrics}}
    return {"stage": record["name"], "seed": record["config"]["seed"],
            "last": {"step": step, "checkpoint": str(checkpoints.checkpoint_dir(stage_dir, step)), "metrics": metrics,
                     "figures": figures, "ci95": {k: stats.ci95(v) for k, v in replicates.items() if v is not None}},
            "curve": [{"step": s, **({"score": score(m)} if any(map(_in_score, m)) else {}),  # none: not decoded
                       **{k: m[k] for k in TEACHER_FORCED if k in m}} for s, m in by_step],
            "_replicates": replicates}


def _summary(per_seed: list[dict], name: str) -> dict | None:
    """mean, std and ci95 over the seeds of one figure; `_replicates` (dropped from results.json) for the tests."""
    values = [r["last"]["figures"][name] for r in per_seed if name in r["last"]["figures"]]
    if not values or len(values) != len(per_seed):
        return None
    reps = [r["_replicates"].get(name) for r in per_seed]
    combined = stats.over_seeds(reps) if all(rep is not None for rep in reps) else None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "ci95": stats.ci95(combined) if combined is not None else None, "per_seed": values,
            "_replicates": combined}


def collect(root: Path) -> dict:
    """results.json's content: per arm and task, each seed's figures, their summary with intervals, the paired
    tests against the best arm, and the seeds' agreement on the ranking."""
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
            figures = {name: summary for name in FIGURE_NAMES if (summary := _summary(per_seed, name))}
            row["tasks"][task] = {"seeds": per_seed, "n": len(per_seed), "figures": figures}
        row["glue_average"] = _glue_average(row["tasks"], [t for t in tasks if t.startswith("glue_")])
        row["shares"] = _shares(root, arm, spec["seeds"][0])
        if model := _model_figures(arm, [records[seed] for seed in spec["seeds"]]):
            row["model"] = model  # only experiments that measure their models have the key
        arms.append(row)
    for task in tasks:
        for name in FIGURE_NAMES:
            _compare(name, [arm["tasks"][task]["figures"].get(name) for arm in arms])
    for name in ("score", "target_nll"):
        _compare(name, [(arm["glue_average"] or {}).get(name) for arm in arms])
    results = {"title": spec["title"], "seeds": spec["seeds"], "eval_num_examples": spec.get("eval_num_examples"),
               "bootstrap_samples": stats.SAMPLES, "tasks": tasks, "arms": arms, "baselines": baselines,
               "kendall_tau": _kendall(arms, tasks), "against_reference": _against_reference(arms, tasks),
               "seconds": _seconds(records)}
    online = _online_speed(root, spec, arms)
    if online:  # only experiments with online arms have the key (the others' results.json stay as they were)
        results["online_steps_to_reach"] = online
    return results


def _model_figures(arm: dict, records: list[dict[str, dict]]) -> dict | None:
    """The arm's evaluated model as `experiment.measure_model` measured it (the last stage that evaluates), per
    seed: parameters, bytes of weights, decoding tokens/s."""
    stage = next((s["name"] for s in reversed(arm["stages"]) if s["evaluate"]), None)
    measured = [r[stage]["model"] for r in records if stage in r and "model" in r[stage]]
    if not measured:
        return None
    speeds = [m["decode_tokens_per_second"] for m in measured]
    return {"parameters": measured[0]["parameters"], "bytes": measured[0]["bytes"],
            "quantize": measured[0]["quantize"], "decode_tokens_per_second": statistics.fmean(speeds),
            "decode_tokens_per_second_per_seed": speeds}


def _model_lines(results: dict) -> list[str]:
    """The model table: parameters, size of the weights and decoding speed, each also against the first arm."""
    arms = [a for a in results["arms"] if a.get("model")]
    if not arms:
        return []
    first = arms[0]["model"]
    lines = ["", "## Model: parameters, size, decoding speed", "",
             f"Against *{arms[0]['name']}*. Size: the weights as `torch.save` writes them (int8 where quantized). "
             "Decoding: greedy, tokens per second (encoder included) on the first task's first 128 validation "
             "inputs in batches of 32, 32 positions decoded for every input whatever it generates, best of three "
             "passes, mean over seeds (per seed in brackets); timed on whatever else the machine ran at the time, "
             "so ratios within one measurement are the figure to read.",
             "", "| arm | parameters | size (MB) | decoding tokens/s | size ratio | speed ratio |",
             "|---|---|---|---|---|---|"]
    for arm in arms:
        m = arm["model"]
        per_seed = ", ".join(f"{v:,.0f}" for v in m["decode_tokens_per_second_per_seed"])
        lines.append(f"| {arm['name']} | {m['parameters']:,} | {m['bytes'] / 2**20:.2f} | "
                     f"{m['decode_tokens_per_second']:,.0f} ({per_seed}) | {m['bytes'] / first['bytes']:.2f} | "
                     f"{m['decode_tokens_per_second'] / first['decode_tokens_per_second']:.2f} |")
    return lines


def _online_speed(root: Path, spec: dict, arms: list[dict]) -> list[dict]:
    """For each online arm and the fixed arm it starts from (its settings with strategy = its `initial`), per seed:
    the first step at which the online arm's mean over the evaluated tasks is at or below the fixed arm's last
    value, and the fixed arm's own first such step (ODM's "fewer iterations to the same loss"). Measured on the
    training loss per task (`task/<t>/loss`, every logged window) and, where stages were evaluated more than once,
    on the held-out target NLL."""
    fixed = {json.dumps(arm.get("notes", {}).get("mixing"), sort_keys=True): arm for arm in spec["arms"]}
    rows = {row["name"]: row for row in arms}
    out = []
    for arm in spec["arms"]:
        settings = dict(arm.get("notes", {}).get("mixing") or {})
        if settings.get("strategy") != "online":
            continue
        online = settings.pop("online", None) or {}
        start = fixed.get(json.dumps({**settings, "strategy": online.get("initial", "proportional")}, sort_keys=True))
        if start is None:
            continue
        tasks = [t for stage in arm["stages"] for t in stage["evaluate"]]
        curves = {
            "training loss": {a["name"]: {seed: _mean_task_loss(root / a["stages"][0]["name"] / f"seed_{seed}", tasks)
                                          for seed in spec["seeds"]} for a in (arm, start)},
            "held-out target NLL": {a["name"]: _mean_target_nll(rows[a["name"]], tasks) for a in (arm, start)},
        }
        measures = {name: _reach(by_arm[arm["name"]], by_arm[start["name"]]) for name, by_arm in curves.items()}
        measures = {name: seeds for name, seeds in measures.items() if seeds}
        out.append({"arm": arm["name"], "start": start["name"], "tasks": tasks, "measures": measures,
                    "target_nll_against_start": _against_start(rows[arm["name"]], rows[start["name"]], tasks)})
    return out


def _against_start(mine: dict, start: dict, tasks: list[str]) -> list[dict]:
    """The online arm's held-out target NLL minus its start's, per task, on the GLUE average and on the mean over
    `tasks` (the mixture search's default target), each with its paired 95% interval and p-value."""
    figures = [(task, mine["tasks"][task]["figures"].get("target_nll"),
                start["tasks"][task]["figures"].get("target_nll")) for task in tasks]
    figures.append(("GLUE average", *((row["glue_average"] or {}).get("target_nll") for row in (mine, start))))
    complete = [(a, b) for _, a, b in figures[:-1] if a and b]
    if len(complete) == len(tasks) and all(_paired(a, b) for a, b in complete):
        figures.append(("mean over the tasks", *({"mean": statistics.fmean(f["mean"] for f in side),
                                                   "per_seed": side[0]["per_seed"],
                                                   "_replicates": np.mean([f["_replicates"] for f in side], axis=0)}
                                                  for side in zip(*complete, strict=True))))
    out = []
    for name, a, b in figures:
        if not a or not b:
            continue
        paired = _paired(a, b)
        out.append({"task": name, "difference": a["mean"] - b["mean"],
                    "ci95": stats.ci95(a["_replicates"] - b["_replicates"]) if paired else None,
                    "p_value": stats.paired_p_value(a["_replicates"], b["_replicates"]) if paired else None})
    return out


def _reach(online: dict[int, list], start: dict[int, list]) -> list[dict]:
    """Per seed with both curves (two points at least): the steps at which each reaches the start's last value."""
    seeds = []
    for seed in sorted(set(online) & set(start)):
        if len(online[seed]) < 2 or len(start[seed]) < 2:
            continue
        target = start[seed][-1][1]
        reach = [next((step for step, value in curve if value <= target), None) for curve in (online[seed],
                                                                                             start[seed])]
        seeds.append({"seed": seed, "steps": reach[0], "start_steps": reach[1], "last": online[seed][-1][1],
                      "start_last": target})
    return seeds


def _mean_task_loss(model_dir: Path, tasks: list[str]) -> list[tuple[int, float]]:
    """(step, mean over `tasks` of the window's per-task training loss) at each logged step that has them all."""
    rows = _metrics(model_dir) if checkpoints.metrics_file(model_dir).is_file() else []
    return [(r["step"], statistics.fmean(r[f"task/{t}/loss"] for t in tasks)) for r in rows
            if all(f"task/{t}/loss" in r for t in tasks)]


def _mean_target_nll(row: dict, tasks: list[str]) -> dict[int, list[tuple[int, float]]]:
    """Per seed: (step, mean over `tasks` of the held-out target NLL) at each evaluated step that has them all."""
    by_seed: dict[int, dict[int, dict[str, float]]] = {}
    for task in tasks:
        for result in row["tasks"][task]["seeds"]:
            for point in result["curve"]:
                if "target_nll" in point:
                    by_seed.setdefault(result["seed"], {}).setdefault(point["step"], {})[task] = point["target_nll"]
    return {seed: [(step, statistics.fmean(values.values())) for step, values in sorted(steps.items())
                   if len(values) == len(tasks)] for seed, steps in by_seed.items()}


def _listed(seeds: list[dict], key: str, fmt: str = "{}") -> str:
    return ", ".join("not reached" if s[key] is None else fmt.format(s[key]) for s in seeds)


def _p(p_value: float) -> str:
    """A bootstrap p-value as text: resampling cannot resolve one below 1 / SAMPLES."""
    return f"p = {p_value:.3f}" if p_value >= 1 / stats.SAMPLES else f"p < {1 / stats.SAMPLES:g}"


def _online_lines(results: dict) -> list[str]:
    lines = []
    for entry in results.get("online_steps_to_reach", []):
        differences = [f"{d['task']} {d['difference']:+.3f}" + (f" [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}], "
                                                               f"{_p(d['p_value'])}" if d["ci95"] else "")
                       for d in entry["target_nll_against_start"]]
        if differences:
            lines.append(f"- *{entry['arm']}* minus *{entry['start']}*, held-out target NLL (negative: the online arm "
                         f"is lower): {'; '.join(differences)}.")
        for measure, seeds in entry["measures"].items():
            start = entry["start"]
            lines.append(f"- *{entry['arm']}*, {measure} (seeds {_listed(seeds, 'seed')}): reaches *{start}*'s last "
                         f"value ({_listed(seeds, 'start_last', '{:.3f}')}) at step {_listed(seeds, 'steps')}; "
                         f"*{start}* reaches it at step {_listed(seeds, 'start_steps')}. The online arm's own last "
                         f"value: {_listed(seeds, 'last', '{:.3f}')}.")
    if not lines:
        return []
    return ["", "## Online mixing against its fixed start", "",
            "Each online arm's held-out target NLL against the fixed arm it starts from (paired 95% bootstrap "
            "interval over examples and seeds); and the steps it takes to reach the fixed arm's last value of the "
            "mean over the evaluated tasks of each task's training loss (`task/<t>/loss`, in windows where every "
            "task was drawn, on the examples each arm drew: within their first epoch here, but not held out) and, "
            "where stages were evaluated more than once, of their held-out target NLL:", "", *lines]


def _glue_average(by_task: dict[str, dict], glue: list[str]) -> dict | None:
    """The GLUE average's score and target NLL: the mean over the GLUE tasks, with replicates averaged alike."""
    out = {}
    for name in ("score", "target_nll"):
        figures = [by_task[t]["figures"].get(name) for t in glue]
        if not glue or None in figures:
            continue
        reps = [f["_replicates"] for f in figures]
        combined = np.mean(reps, axis=0) if all(r is not None for r in reps) else None
        seeds = {len(f["per_seed"]) for f in figures}
        per_seed = ([statistics.fmean(f["per_seed"][i] for f in figures) for i in range(seeds.pop())]
                    if len(seeds) == 1 else None)
        out[name] = {"mean": statistics.fmean(f["mean"] for f in figures),
                     "std": statistics.stdev(per_seed) if per_seed and len(per_seed) > 1 else None,
                     "ci95": stats.ci95(combined) if combined is not None else None, "per_seed": per_seed,
                     "_replicates": combined}
    return out or None


def _compare(name: str, figures: list[dict | None]) -> None:
    """Mark the best arm's figure, and give every other arm's its paired bootstrap p-value against it (on the same
    examples and seeds; None where replicates are missing or the seeds differ)."""
    present = [f for f in figures if f is not None]
    if not present:
        return
    best = (min if name in LOWER_IS_BETTER else max)(present, key=lambda f: f["mean"])
    for figure in present:
        figure["best"] = figure is best
        figure["p_value"] = (None if figure is best else
                             stats.paired_p_value(figure["_replicates"], best["_replicates"])
                             if _paired(figure, best) else None)


def _paired(a: dict, b: dict) -> bool:
    """Two figures' replicates pair up: both have them, over as many seeds (so the seed draws match)."""
    return (a["_replicates"] is not None and b["_replicates"] is not None
            and len(a["per_seed"] or []) == len(b["per_seed"] or []))


def _against_reference(arms: list[dict], tasks: list[str]) -> list[dict]:
    """Each arm's difference from the reference arm (notes `reference`, e.g. training from scratch) per task and
    figure, with its paired 95% interval and p-value: whether pre-training paid, in each figure."""
    reference = next((arm for arm in arms if arm["notes"].get("reference")), None)
    out = []
    for arm in arms:
        if reference is None or arm is reference:
            continue
        for task in tasks:
            for name in ("score", "target_nll", "label_accuracy"):
                mine, theirs = arm["tasks"][task]["figures"].get(name), reference["tasks"][task]["figures"].get(name)
                if not mine or not theirs:
                    continue
                paired = _paired(mine, theirs)
                diff = mine["_replicates"] - theirs["_replicates"] if paired else None
                out.append({"arm": arm["name"], "reference": reference["name"], "task": task, "figure": name,
                            "difference": mine["mean"] - theirs["mean"],
                            "ci95": stats.ci95(diff) if paired else None,
                            "p_value": stats.paired_p_value(mine["_replicates"], theirs["_replicates"])
                            if paired else None})
    return out


def _verdicts(results: dict) -> list[str]:
    """One line per arm and task: the difference from the reference arm in each figure, and whether it holds."""
    lines, rows = [], results.get("against_reference") or []
    for arm, task in dict.fromkeys((r["arm"], r["task"]) for r in rows):
        parts, paid = [], []
        for r in (r for r in rows if r["arm"] == arm and r["task"] == task):
            label = FIGURE_NAMES[r["figure"]]
            better = r["difference"] < 0 if r["figure"] in LOWER_IS_BETTER else r["difference"] > 0
            if r["p_value"] is None:
                verdict = "untested"
            elif r["p_value"] < 0.05:
                verdict = f"{'better' if better else 'worse'} at 95% (p = {r['p_value']:.3f})"
                paid += [label] if better else []
            else:
                verdict = f"no difference at 95% (p = {r['p_value']:.2f})"
            interval = f" [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]" if r.get("ci95") else ""
            parts.append(f"{label} {r['difference']:+.3f}{interval}: {verdict}")
        lines.append(f"- *{arm}* on `{task}`: " + "; ".join(parts) + ". "
                     + (f"**It paid** in {', '.join(paid)}." if paid else "**It did not pay** in any figure at 95%."))
    return lines


def _kendall(arms: list[dict], tasks: list[str]) -> dict[str, dict[str, float | None]]:
    """{task or "glue_average": {figure: mean Kendall tau between seeds' rankings of the arms}}, over the arms that
    have every seed; empty with one seed."""
    out: dict[str, dict[str, float | None]] = {}
    for task in [*tasks, "glue_average"]:
        for name in FIGURE_NAMES:
            figures = [(arm["glue_average"] or {}).get(name) if task == "glue_average"
                       else arm["tasks"][task]["figures"].get(name) for arm in arms]
            rows = [f["per_seed"] for f in figures if f and f.get("per_seed")]
            if len(rows) < 2 or len({len(r) for r in rows}) != 1 or len(rows[0]) < 2:
                continue
            by_seed = [[row[i] for row in rows] for i in range(len(rows[0]))]
            out.setdefault(task, {})[name] = stats.kendall_tau(by_seed)
    return out


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
    mixture = checkpoints.read_mixture(model_dir)
    if mixture is None or not checkpoints.metrics_file(model_dir).is_file():
        return None
    rows = checkpoints.read_metrics(model_dir)
    configured = mixture["tasks"]
    seen = {t: rows[-1].get(f"task/{t}/examples", 0.0) for t in configured} if rows else {}
    total = sum(seen.values()) or 1.0
    shares = {t: {"configured": v["share"], "measured": seen.get(t, 0.0) / total} for t, v in configured.items()}
    for t, figures in shares.items():  # an online run: its last rates too (its configured shares are the initial)
        if rows and f"rate/{t}" in rows[-1]:
            figures["final_rate"] = rows[-1][f"rate/{t}"]
    return shares


def _cell(figure: dict | None, digits: int = 2) -> str:
    """`mean [low, high]`, bold for the best arm, `*` where the paired test says it differs from the best (p < 0.05)."""
    if not figure:
        return "-"
    text = f"{figure['mean']:.{digits}f}"
    if figure.get("ci95"):
        low, high = figure["ci95"]
        text += f" [{low:.{digits}f}, {high:.{digits}f}]"
    if figure.get("best"):
        return f"**{text}**"
    p = figure.get("p_value")
    return text + ("*" if p is not None and p < 0.05 else "")


def _table(results: dict, name: str, tasks: list[str], with_glue: bool, baseline: bool) -> list[str]:
    digits = 3 if name in ("target_nll", "gold_label_logprob") else 2
    head = ["arm", "seeds", *tasks] + (["GLUE avg"] if with_glue else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in results["arms"]:
        n = max((arm["tasks"][t]["n"] for t in tasks), default=0)
        cells = [_cell(arm["tasks"][t]["figures"].get(name), digits) for t in tasks]
        if with_glue:
            cells.append(_cell((arm["glue_average"] or {}).get(name), digits))
        lines.append(f"| {arm['name']} | {n} | " + " | ".join(cells) + " |")
    base = results["baselines"]
    if baseline and base:
        key = (lambda m: score(m)) if name == "score" else (lambda m: m.get("label_accuracy", math.nan))
        cells = [f"{key(base[t]['metrics']):.2f}" if t in base else "-" for t in tasks]
        if with_glue:
            glue = [key(base[t]["metrics"]) for t in tasks if t.startswith("glue_") and t in base]
            cells.append(f"{statistics.fmean(glue):.2f}" if glue else "-")
        lines.append("| majority class / constant prediction | - | " + " | ".join(cells) + " |")
    return lines


def _reliability(results: dict) -> list[str]:
    """Which figure ranks the arms alike across seeds (mean Kendall tau over tasks) and how many arms it tells
    apart from the best at 95%."""
    taus = results.get("kendall_tau") or {}
    if not taus:
        return ["With one seed, the seeds' agreement on a ranking is not measured; the intervals are over examples "
                "only and say nothing about the variation between training runs."]
    lines = ["| figure | mean Kendall tau between seeds (over tasks) | arm-task pairs that differ from the best "
             "at 95% |", "|---|---|---|"]
    best_name, best_tau = None, -math.inf
    for name, label in FIGURE_NAMES.items():
        values = [v[name] for task, v in taus.items() if task != "glue_average" and v.get(name) is not None
                  and not math.isnan(v[name])]
        figures = [arm["tasks"][t]["figures"].get(name) for arm in results["arms"] for t in results["tasks"]]
        tested = [f for f in figures if f and f.get("p_value") is not None]
        if not values:
            continue
        tau = statistics.fmean(values)
        if tau > best_tau:
            best_name, best_tau = label, tau
        lines.append(f"| {label} | {tau:.2f} ({len(values)} task{'s' if len(values) > 1 else ''}) | "
                     f"{sum(f['p_value'] < 0.05 for f in tested)} of {len(tested)} |")
    verdict = ("ranks the arms most alike across seeds" + (" (tau >= 0.5: a usable ranking at this budget)"
               if best_tau >= 0.5 else " but below tau 0.5: no figure ranks the arms reliably at this budget"))
    return [*lines, "", f"**{best_name}** {verdict}." if best_name else ""]


def _findings(results: dict) -> list[str]:
    """Per task: the best arm on score and on target NLL, and the arms not told apart from it at 95%."""
    lines = []
    for task in results["tasks"]:
        parts = []
        for name in ("score", "target_nll", "label_accuracy"):
            figures = [(arm["name"], arm["tasks"][task]["figures"].get(name)) for arm in results["arms"]]
            figures = [(arm, f) for arm, f in figures if f]
            best = next((arm for arm, f in figures if f.get("best")), None)
            if best is None or len(figures) < 2 or all(f.get("p_value") is None for _, f in figures):
                continue  # untested: evaluations from before bootstrap replicates were kept
            tied = [arm for arm, f in figures if not f.get("best") and (f.get("p_value") is None
                                                                         or f["p_value"] >= 0.05)]
            parts.append(f"{FIGURE_NAMES[name]}: best *{best}*" + (
                f", not told apart from {', '.join(f'*{a}*' for a in tied)}" if tied
                else ", ahead of every other arm at 95%"))
        if parts:
            lines.append(f"- `{task}`: " + "; ".join(parts) + ".")
    return lines


def markdown(results: dict) -> str:
    tasks = results["tasks"]
    has_glue = any(t.startswith("glue_") for t in tasks)
    labelled = [t for t in tasks if any("label_accuracy" in a["tasks"][t]["figures"] for a in results["arms"])]
    intervals = any(f.get("ci95") for a in results["arms"] for t in tasks for f in a["tasks"][t]["figures"].values())
    lines = [f"# {results['title']}", "",
             "Every figure is the last checkpoint's of its stage (no checkpoint is selected on the examples it is "
             "scored on), the mean over seeds where there are several, "
             + (f"with its 95% bootstrap interval in brackets ({results['bootstrap_samples']} resamples of the "
                "examples" + (", and of the seeds" if len(results["seeds"]) > 1 else "") + "). **Bold**: the best "
                "arm; `*`: differs from the best arm at 95% (paired bootstrap on the same examples and seeds, "
                "p < 0.05). " if intervals else
                "without intervals: these evaluations predate the bootstrap replicates (**bold**: the best arm). ")
             + "A task's score is the mean of its official metrics (CoNLL: entity F1; an undefined correlation, "
             "from constant predictions, counts as 0); the GLUE average is the mean over the GLUE tasks here. "
             + (f"Every arm and the baseline are scored on the same first {results['eval_num_examples']} "
                "validation examples of each task (all of them where a task has fewer)."
                if results.get("eval_num_examples") else "Scored on each task's whole validation split."), "",
             "## Score (official metrics, decoded)", "", *_table(results, "score", tasks, has_glue, True)]
    if any("target_nll" in a["tasks"][t]["figures"] for a in results["arms"] for t in tasks):
        lines += ["", "## Target NLL (teacher-forced, nats per target token; lower is better)", "",
                  *_table(results, "target_nll", tasks, has_glue, False)]
    if labelled:
        lines += ["", "## Label accuracy (rank classification over the label set)", "",
                  *_table(results, "label_accuracy", labelled, False, True), "",
                  "## Gold label log-probability (renormalised over the label set; 0 is certain and right)", "",
                  *_table(results, "gold_label_logprob", labelled, False, False)]
    lines += _model_lines(results)
    verdicts = _verdicts(results)
    if verdicts:
        reference = results["against_reference"][0]["reference"]
        lines += ["", f"## Against *{reference}*", "", "Each arm's difference from the reference arm (the "
                  "arm's figure minus the reference's; for target NLL lower is better), with its paired 95% "
                  "bootstrap interval:", "", *verdicts]
    lines += _online_lines(results)
    findings = _findings(results)
    lines += ["", "## What the intervals say", "", *(findings or [
        "No figure has bootstrap replicates (evaluations from before they were kept): nothing is tested."]),
        "", "## Which figure ranks reliably", "", *_reliability(results)]
    base = results["baselines"]
    if base:
        lines += ["", "Constant predictions: " + "; ".join(f"`{t}`: {base[t]['prediction']!r}" for t in base)]
    for arm in results["arms"]:
        shares = arm.get("shares")
        if shares and any("final_rate" in v for v in shares.values()):
            lines += ["", f"Mixture of **{arm['name']}** (`{arm['mixture']}`, online; `rates.png`): initial share "
                          "of examples -> share trained on -> last rate: " + ", ".join(
                              f"{t} {v['configured']:.1%} -> {v['measured']:.1%} -> {v['final_rate']:.1%}"
                              for t, v in shares.items())]
        elif shares:
            lines += ["", f"Mixture of **{arm['name']}** (`{arm['mixture']}`): configured share of examples -> "
                          "share trained on: " + ", ".join(f"{t} {v['configured']:.1%} -> {v['measured']:.1%}"
                                                          for t, v in shares.items())]
    if results.get("seconds"):
        t = results["seconds"]
        lines += ["", f"Wall time in {t['stages']} of {t['of_stages']} stages: training {t['train']:,.0f} s, "
                      f"evaluation {t['eval']:,.0f} s (each stage's last run; stage.json `seconds`)."]
    lines += ["", "Plots: `scores.png` and `target_nll.png` (one panel per task: each arm with its 95% interval, "
                  "the constant baseline dashed), `loss.png` (training loss per stage), `task_losses.png` "
                  "(per-task loss in multi-task stages), `shares.png` (configured against trained-on shares). "
                  "results.json has every metric, each checkpoint's figures as a curve, every p-value and "
                  "Kendall's tau between the seeds' rankings."]
    return "\n".join(lines) + "\n"


def _public(value):
    """results.json's content without the bootstrap replicates (kept in each evaluation's bootstrap.npz)."""
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [_public(v) for v in value]
    return value


def build(root: Path | str) -> dict:
    """Write results.json, results.md and the plots of the experiment in `root`; return the results (with each
    figure's bootstrap replicates under `_replicates`, which results.json leaves out)."""
    root = Path(root)
    if not (root / "experiment.json").is_file():
        raise FileNotFoundError(f"{root}: no experiment.json; is this an EXPERIMENT_DIR that `mtp experiment` wrote?")
    results = collect(root)
    (root / "results.json").write_text(json.dumps(_public(results), indent=2) + "\n")
    (root / "results.md").write_text(markdown(results))
    plots(root, results)
    return results


def _panels(plt, count: int, columns: int = 4):
    rows = max(1, math.ceil(count / columns))
    fig, axes = plt.subplots(rows, min(columns, max(1, count)), figsize=(3.6 * min(columns, max(1, count)),
                                                                         2.9 * rows + 0.6), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _figure_grid(plt, results: dict, name: str, path: Path, baseline) -> None:
    """One panel per task (and the GLUE average): each arm's figure with its 95% interval as an error bar."""
    arms = results["arms"]
    columns = [(t, [a["tasks"][t]["figures"].get(name) for a in arms]) for t in results["tasks"]]
    if any(a["glue_average"] and name in a["glue_average"] for a in arms):
        columns.append(("GLUE average", [(a["glue_average"] or {}).get(name) for a in arms]))
    columns = [(t, figures) for t, figures in columns if any(figures)]
    fig, axes = _panels(plt, max(1, len(columns)))
    for ax, (task, figures) in zip(axes, columns, strict=False):
        for i, figure in enumerate(figures):
            if not figure:
                continue
            low, high = figure["ci95"] or (figure["mean"], figure["mean"])
            ax.bar(i, figure["mean"], color=f"C{i % 10}", label=arms[i]["name"])
            ax.errorbar(i, figure["mean"], yerr=[[figure["mean"] - low], [high - figure["mean"]]], color="black",
                        capsize=3, lw=1)
        constant = baseline(task)
        if constant is not None:
            ax.axhline(constant, color="black", ls="--", lw=1, label="constant prediction")
        if name in LOWER_IS_BETTER:  # bars from a floor near the values, every interval whole inside the panel
            bounds = [b for f in figures if f for b in (f["ci95"] or (f["mean"], f["mean"]))]
            span = (max(bounds) - min(bounds)) or abs(max(bounds)) or 1.0
            ax.set_ylim(min(bounds) - 0.05 * span, max(bounds) + 0.05 * span)
        ax.set_title(task, fontsize=9)
        ax.set_xticks([])
    fig.suptitle(FIGURE_NAMES[name] + " (last checkpoint, 95% bootstrap interval)", fontsize=10)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(4, len(names) or 1), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.08 + 0.02 * math.ceil(len(arms) / 4), 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _legend(ax, **style) -> None:
    """A legend where the panel has labelled lines or bars (an experiment without mixtures draws no shares)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**style)


def _learning_curves(plt, results: dict, path: Path) -> None:
    """For experiments over training-set sizes (arms noting `train_examples`, as `strategies.low_resource`'s):
    score and target NLL against labelled examples, one line per arm with its 95% interval as a band."""
    from matplotlib.ticker import NullFormatter

    sizes = next((arm["notes"]["train_examples"] for arm in results["arms"]
                  if arm["notes"].get("train_examples")), None)
    if not sizes:
        return
    base_tasks = sorted({v["task"] for v in sizes.values()})
    fig, axes = _panels(plt, 2 * len(base_tasks), columns=2)
    for row, task in enumerate(base_tasks):
        columns = sorted((v["examples"], name) for name, v in sizes.items() if v["task"] == task)
        for ax, name in zip(axes[2 * row: 2 * row + 2], ("score", "target_nll"), strict=True):
            for i, arm in enumerate(results["arms"]):
                points = [(n, f) for n, column in columns
                          if (f := arm["tasks"].get(column, {}).get("figures", {}).get(name))]
                if not points:
                    continue
                x = [n for n, _ in points]
                ax.plot(x, [f["mean"] for _, f in points], marker="o", color=f"C{i % 10}", label=arm["name"])
                bands = [(n, f["ci95"]) for n, f in points if f.get("ci95")]
                if bands:
                    ax.fill_between([n for n, _ in bands], [b[0] for _, b in bands], [b[1] for _, b in bands],
                                    color=f"C{i % 10}", alpha=0.2)
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # a narrow range labels its minor ticks on top of each other
            ax.set_xlabel("labelled training examples")
            ax.set_title(f"{task}: {FIGURE_NAMES[name]}", fontsize=9)
    _legend(axes[0], fontsize=7)
    _save(fig, path)


def plots(root: Path, results: dict) -> None:
    """scores.png, target_nll.png, loss.png, task_losses.png, shares.png (and learning_curve.png for experiments
    over training-set sizes) beside results.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = results["baselines"]

    def constant_score(task: str) -> float | None:
        if task == "GLUE average":
            glue = [score(base[t]["metrics"]) for t in results["tasks"] if t.startswith("glue_") and t in base]
            return statistics.fmean(glue) if glue else None
        return score(base[task]["metrics"]) if task in base else None

    _figure_grid(plt, results, "score", root / "scores.png", constant_score)
    _figure_grid(plt, results, "target_nll", root / "target_nll.png", lambda task: None)
    _learning_curves(plt, results, root / "learning_curve.png")
    arms = results["arms"]

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
    _legend(ax, fontsize=7)
    ax2.set_xlabel("step")
    ax2.set_ylabel("per-task training loss")
    _legend(ax2, fontsize=6, ncol=2)
    _save(fig, root / "loss.png")
    _save(fig2, root / "task_losses.png")

    with_shares = [arm for arm in arms if arm.get("shares")]
    fig, axes = _panels(plt, max(1, len(with_shares)), columns=3)
    for ax, arm in zip(axes, with_shares, strict=False):
        names = list(arm["shares"])
        x = np.arange(len(names))
        ax.bar(x - 0.2, [arm["shares"][t]["configured"] for t in names], 0.4, label="configured")
        ax.bar(x + 0.2, [arm["shares"][t]["measured"] for t in names], 0.4, label="trained on")
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=7)
        ax.set_title(arm["name"], fontsize=8)
    _legend(axes[0], fontsize=7)
    _save(fig, root / "shares.png")
    _rate_trajectories(plt, spec, root / "rates.png")
    if results.get("online_steps_to_reach"):
        _target_nll_curves(plt, results, root / "target_nll_curves.png")


def _target_nll_curves(plt, results: dict, path: Path) -> None:
    """target_nll_curves.png: each arm's held-out target NLL, the mean over its evaluated tasks, at every evaluated
    step (thin: each seed; thick: their mean), where stages were evaluated more than once."""
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for i, arm in enumerate(results["arms"]):
        tasks = [t for t in results["tasks"] if arm["tasks"][t]["seeds"]]
        by_seed = _mean_target_nll(arm, tasks) if tasks else {}
        curves = [points for points in by_seed.values() if len(points) > 1]
        if not curves:
            continue
        drawn = True
        for points in curves:
            ax.plot(*zip(*points, strict=True), color=f"C{i % 10}", lw=0.6, alpha=0.4)
        steps = sorted(set.intersection(*(set(dict(points)) for points in curves)))
        ax.plot(steps, [statistics.fmean(dict(points)[step] for points in curves) for step in steps],
                color=f"C{i % 10}", lw=2, marker="o", ms=3, label=arm["name"])
    if not drawn:
        plt.close(fig)
        return
    ax.set_xlabel("step")
    ax.set_ylabel("held-out target NLL, mean over tasks")
    _legend(ax, fontsize=7)
    _save(fig, path)


def _rate_trajectories(plt, spec: dict, path: Path) -> None:
    """rates.png: each online arm's share per task over its steps, one line per seed (only where an arm has one)."""
    panels = []
    for arm in spec["arms"]:
        stage = next((s for s in arm["stages"] if s["train_on"] == arm.get("mixture")), None)
        runs = [_metrics(path.parent / stage["name"] / f"seed_{seed}") for seed in spec["seeds"]] if stage else []
        if any(any(k.startswith("rate/") for k in rows[-1]) for rows in runs if rows):
            panels.append((arm["name"], runs))
    if not panels:
        return
    fig, axes = _panels(plt, len(panels), columns=2)
    for ax, (name, runs) in zip(axes, panels, strict=False):
        tasks = sorted({k[len("rate/"):] for rows in runs for r in rows for k in r if k.startswith("rate/")})
        for i, task in enumerate(tasks):
            for seed_index, rows in enumerate(runs):
                points = [(r["step"], r[f"rate/{task}"]) for r in rows if f"rate/{task}" in r]
                if points:
                    ax.plot(*zip(*points, strict=True), color=f"C{i % 10}", lw=1, alpha=1.0 if seed_index == 0 else 0.4,
                            label=task if seed_index == 0 else None)
        ax.set_title(f"{name}: share per task (each seed)", fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("rate")
    _legend(axes[0], fontsize=6, ncol=2)
    _save(fig, path)


def _metrics(model_dir: Path) -> list[dict]:
    return [r for r in checkpoints.read_metrics(model_dir) if "loss" in r]


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
