"""`mtp mixture search MIXTURE`: find a mixture's rates from small proxy runs instead of guessing them (RegMix).

1. Draw `num_runs` mixtures from a Dirichlet around the prior (the mixture's configured shares;
   `regression.dirichlet`), each a proxy run: a stage of the experiment machinery (`experiment.run_stage`) that
   trains `steps` steps on those rates and measures every task's held-out `target_nll` (teacher-forced, no
   decoding). Proxies are `SEARCH_DIR/proxy_<i>/seed_<seed>/`: an interrupted search resumes, finished runs are
   reused, and asking for more runs keeps the first ones (draw i depends on the seed and i alone).
2. Fit each task's loss on the shares with every model of `regression.MODELS`, cross-validated on held-out proxy
   runs (Spearman's rho of the target), and keep the model that ranks best.
3. Propose the mean of the top-k of `candidates` mixtures drawn as the proxies were, by predicted target (a
   weighted mean of tasks' losses; default: the mean over the supervised tasks); write it as `proposal.gin`, which
   `mtp train` and experiments take (`SEARCHED_WEIGHTS`, and a declared mixture `<MIXTURE>_searched`).
4. With `validation_dir` (an experiment that trained the proposal beside fixed strategies, e.g.
   gin/experiments/mixture_search_validation.gin), set the predicted target beside the measured one, with
   intervals and paired tests against the searched arm.

Writes `results.json`, `results.md`, `predicted_vs_measured.png` and `rates.png` to SEARCH_DIR.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import gin
import numpy as np
import seqio

from mtplatform import experiment, mixing, regression, stats, strategies, validation

PROPOSAL_MACRO = "SEARCHED_WEIGHTS"
DEFAULT_COMPARE = {
    "equal": {"strategy": "equal"},
    "proportional K=2^12": {"strategy": "proportional", "cap": 4096},
    "proportional K=2^14": {"strategy": "proportional", "cap": 16384},
    "temperature T=2": {"strategy": "temperature", "temperature": 2.0, "cap": 65536},
    "temperature T=4": {"strategy": "temperature", "temperature": 4.0, "cap": 65536},
}


class SearchError(ValueError):
    """A search's settings cannot work; the message names the mixture, task or setting."""


def min_runs(num_tasks: int) -> int:
    """Proxy runs a fit needs: more than the mixing law's parameters per task (K + 2), and at least 8."""
    return max(8, num_tasks + 3)


@gin.configurable
def mixture_search(
    mixture: str = gin.REQUIRED,
    search_dir: str = gin.REQUIRED,
    num_runs: int = 48,
    steps: int = 200,
    concentration: float = 1.0,
    target: Mapping[str, float] | None = None,
    seed: int = 0,
    eval_num_examples: int | None = 200,
    models: Sequence[str] = regression.MODELS,
    folds: int = 5,
    candidates: int = 100_000,
    top_k: int = 100,
    compare: Mapping[str, Mapping] = DEFAULT_COMPARE,
    validation_dir: str | None = None,
    validation_arm: str = "searched",
) -> Path:
    """Run (or resume) the proxy runs, fit, propose, report; return SEARCH_DIR."""
    _check_settings(search_dir, num_runs, steps, concentration, seed, eval_num_examples, models, folds, candidates,
                    top_k)
    resolved = _prior(mixture)
    tasks = list(resolved.rates)
    evaluated = _evaluated(tasks)
    weights = _target_weights(mixture, tasks, evaluated, target)
    if num_runs < min_runs(len(tasks)):
        raise SearchError(f"mixture_search.num_runs = {num_runs}: too few proxy runs to fit {len(tasks)} tasks' "
                          f"rates; use at least {min_runs(len(tasks))}")
    root = Path(search_dir)
    prior = np.array([resolved.shares[t] for t in tasks])
    draws = regression.dirichlet(prior, concentration, num_runs, seed)
    _check_same_draws(root, mixture, tasks, prior, concentration, seed)
    losses = _run_proxies(root, mixture, tasks, evaluated, draws, steps, seed, eval_num_examples)
    w = np.array([weights[t] for t in evaluated])
    fits = {m: regression.cross_validate(m, draws, losses, w, folds, seed) for m in models}
    chosen = regression.best_model(fits, list(models))
    predictor = regression.fit(chosen, draws, losses, seed)
    search = _Fitted(draws, losses, fits, chosen, predictor,
                     regression.propose(predictor, w, prior, concentration, candidates, top_k, seed))
    results = _results(mixture, resolved, evaluated, weights, search, compare,
                       dict(num_runs=num_runs, steps=steps, concentration=concentration, seed=seed,
                            eval_num_examples=eval_num_examples, folds=folds, candidates=candidates, top_k=top_k))
    if validation_dir:
        results["validation"] = _validation(Path(validation_dir), validation_arm, tasks, evaluated, w, predictor)
    _write(root, results)
    return root


def _check_settings(search_dir, num_runs, steps, concentration, seed, eval_num_examples, models, folds, candidates,
                    top_k) -> None:
    validation.path_setting("mixture_search.search_dir (EXPERIMENT_DIR)", search_dir)
    validation.positive_int("mixture_search.num_runs", num_runs)
    validation.positive_int("mixture_search.steps", steps)
    validation.number_in("mixture_search.concentration", concentration, 0.0, low_open=True)
    validation.whole_number("mixture_search.seed", seed, 0, 2**31 - 1)
    validation.positive_int("mixture_search.eval_num_examples", eval_num_examples, allow_none=True)
    validation.whole_number("mixture_search.folds", folds, 2)
    validation.positive_int("mixture_search.candidates", candidates)
    validation.whole_number("mixture_search.top_k", top_k, 1, candidates)
    unknown = [m for m in models if m not in regression.MODELS]
    if not models or unknown:
        raise SearchError(f"mixture_search.models = {list(models)!r}: choose from {', '.join(regression.MODELS)}")


def _prior(mixture: str) -> mixing.Resolved:
    """The mixture's configured rates: the centre the proxies are drawn around."""
    provider = seqio.get_mixture_or_task(mixture)
    if isinstance(provider, seqio.Task) or len(provider.tasks) < 2:
        names = [t.name for t in seqio.get_subtasks(provider)]
        raise SearchError(f"mixture {mixture} has one task ({names[0]}): a mixture search needs at least two")
    if mixing.needs_budget(provider):
        raise SearchError(f"mixture {mixture}: its UniMax rates need a budget; set mixing.budget_examples, or "
                          "another strategy for the prior")
    return mixing.resolve(provider)


def _evaluated(tasks: Sequence[str]) -> list[str]:
    """The tasks whose held-out loss a proxy measures: those with metrics and a validation split."""
    out = [t for t in tasks if (task := seqio.get_mixture_or_task(t)).metric_fns and "validation" in task.splits]
    if not out:
        raise SearchError(f"no task of {', '.join(tasks)} has a validation split with metrics to measure")
    return out


def _target_weights(mixture: str, tasks: Sequence[str], evaluated: Sequence[str],
                    target: Mapping[str, float] | None) -> dict[str, float]:
    """The target's weight per evaluated task; default: 1 for each supervised one."""
    if target is None:
        supervised = [t for t in evaluated if t not in mixing.UNSUPERVISED_TASKS] or list(evaluated)
        return {t: float(t in supervised) for t in evaluated}
    for task, weight in target.items():
        if task not in tasks:
            raise SearchError(f"mixture_search.target names task {task}, which is not in mixture {mixture} "
                              f"({', '.join(tasks)})")
        if task not in evaluated:
            raise SearchError(f"mixture_search.target names task {task}, which has no validation split with "
                              "metrics: its held-out loss is not measured")
        validation.number_in(f"mixture_search.target[{task!r}]", weight, 0.0)
    if not any(target.values()):
        raise SearchError("mixture_search.target: every weight is zero")
    return {t: float(target.get(t, 0.0)) for t in evaluated}


def _check_same_draws(root: Path, mixture: str, tasks: Sequence[str], prior: np.ndarray, concentration: float,
                      seed: int) -> None:
    """A search directory holds proxies of one prior: rates drawn otherwise would not be the runs found there."""
    path = root / "search.json"
    drawn_with = {"mixture": mixture, "tasks": list(tasks), "prior": [round(float(p), 12) for p in prior],
                  "concentration": concentration, "seed": seed}
    if path.is_file():
        saved = json.loads(path.read_text())
        changed = next((k for k in drawn_with if saved.get(k) != drawn_with[k]), None)
        if changed:
            raise SearchError(f"{path}: its proxy runs were drawn with another {changed} ({saved.get(changed)!r}, "
                              f"now {drawn_with[changed]!r}); use another EXPERIMENT_DIR or delete that one")
    root.mkdir(parents=True, exist_ok=True)
    experiment.write_json(path, drawn_with)


def _run_proxies(root: Path, mixture: str, tasks: Sequence[str], evaluated: Sequence[str], draws: np.ndarray,
                 steps: int, seed: int, eval_num_examples: int | None) -> np.ndarray:
    """Each proxy's held-out target NLL per evaluated task, (runs, tasks); finished proxies are read, not rerun."""
    losses = []
    for i, shares in enumerate(draws):
        name = f"{mixture}_proxy_{i:03d}"
        # A plain seqio mixture: gin's mixing.* bindings (the prior's strategy) must not override these rates.
        if name in seqio.MixtureRegistry.names():
            seqio.MixtureRegistry.remove(name)
        seqio.MixtureRegistry.add(name, [(t, float(s)) for t, s in zip(tasks, shares, strict=True)])
        stage = strategies.Stage(f"proxy_{i:03d}", name, steps, "pretrain", None, tuple(evaluated))
        print(f"search: proxy {i + 1}/{len(draws)}: " + ", ".join(f"{t} {s:.3f}" for t, s in zip(
            tasks, shares, strict=True)), file=sys.stderr)
        record = experiment.run_stage(root, stage, seed, {}, eval_num_examples, 1, decode=False)
        measured = record["evaluations"][str(steps)]
        losses.append([measured[t]["target_nll"] for t in evaluated])
    return np.array(losses)


def _strategy_shares(resolved: mixing.Resolved, settings: Mapping, name: str) -> np.ndarray:
    """A compared strategy's shares over the mixture's tasks: its own settings over the defaults, not gin's
    `mixing.*` bindings (those set the prior)."""
    rates = mixing.rates_from_sizes(resolved.sizes, replace(mixing.DEFAULTS, **settings), name)
    total = sum(rates.values())
    return np.array([rates[t] / total for t in resolved.rates])


@dataclass(frozen=True)
class _Fitted:
    """What a search measured and fitted: the proxies' shares (`draws`) and held-out losses, every model's
    cross-validated fit, the model chosen, its predictor fitted on all proxies, and the proposed shares."""

    draws: np.ndarray
    losses: np.ndarray
    fits: dict[str, dict]
    chosen: str
    predictor: regression.Predictor
    proposal: np.ndarray


def _results(mixture: str, resolved: mixing.Resolved, evaluated: list[str], weights: Mapping[str, float],
             search: _Fitted, compare: Mapping[str, Mapping], settings: dict) -> dict:
    """results.json's content (before any validation)."""
    tasks = list(resolved.rates)
    w = np.array([weights[t] for t in evaluated])
    draws, losses, fits, predictor = search.draws, search.losses, search.fits, search.predictor
    measured = regression.target(losses, w)
    cv = fits[search.chosen]["predicted"]
    strategies_ = {"prior (the mixture's configured rates)": np.array([resolved.shares[t] for t in tasks]),
                   **{name: _strategy_shares(resolved, s, name) for name, s in compare.items()}}

    def predicted(shares: np.ndarray) -> dict:
        per_task = predictor(shares[None])[0]
        return {"rates": dict(zip(tasks, map(float, shares), strict=True)),
                "predicted": dict(zip(evaluated, map(float, per_task), strict=True)),
                "predicted_target": float(regression.target(per_task[None], w)[0])}
    return {
        "mixture": mixture, "tasks": tasks, "evaluated": evaluated, "target_weights": weights, "settings": settings,
        "proxy": [{"name": f"proxy_{i:03d}", "rates": dict(zip(tasks, map(float, d), strict=True)),
                   "measured": dict(zip(evaluated, map(float, row), strict=True)), "measured_target": float(m),
                   "cv_predicted_target": float(p)}
                  for i, (d, row, m, p) in enumerate(zip(draws, losses, measured, regression.target(cv, w),
                                                          strict=True))],
        "fits": {m: {"spearman": f["spearman"], "per_task": dict(zip(evaluated, f["per_task"], strict=True))}
                 for m, f in fits.items()},
        "model": search.chosen, "spearman": fits[search.chosen]["spearman"],
        "proposal": predicted(search.proposal),
        "strategies": {name: predicted(shares) for name, shares in strategies_.items()},
    }


def _validation(root: Path, arm_name: str, tasks, evaluated, w: np.ndarray, predictor) -> list[dict]:
    """Each arm of the validation experiment: its predicted target (from the shares its run recorded) and its
    measured one (mean over seeds, 95% bootstrap interval over examples and seeds), and its paired difference
    from the searched arm."""
    from mtplatform import report

    arms = [a for a in report.collect(root)["arms"] if a.get("shares")]
    names = [a["name"] for a in arms]
    if arm_name not in names:
        raise SearchError(f"mixture_search.validation_arm = {arm_name!r}: {root} has no finished multi-task arm of "
                          f"that name ({', '.join(names) or 'none'})")
    measured = {a["name"]: _measured_target(a, evaluated, w) for a in arms}
    searched = measured[arm_name]
    rows = []
    for arm in arms:
        shares = np.array([arm["shares"].get(t, {}).get("configured", 0.0) for t in tasks])
        m = measured[arm["name"]]
        row = {"arm": arm["name"], "rates": dict(zip(tasks, map(float, shares), strict=True)),
               "predicted_target": float(regression.target(predictor(shares[None]), w)[0]),
               "measured_target": m["mean"], "ci95": stats.ci95(m["replicates"]), "seeds": m["seeds"]}
        if arm["name"] != arm_name:
            diff = m["replicates"] - searched["replicates"]
            row |= {"minus_searched": m["mean"] - searched["mean"], "minus_searched_ci95": stats.ci95(diff),
                    "p_value": stats.paired_p_value(m["replicates"], searched["replicates"])}
        rows.append(row)
    return rows


def _measured_target(arm: dict, evaluated: Sequence[str], w: np.ndarray) -> dict:
    figures = [arm["tasks"][t]["figures"].get("target_nll") for t in evaluated]
    missing = [t for t, f in zip(evaluated, figures, strict=True) if f is None or f["_replicates"] is None]
    if missing:
        raise SearchError(f"validation arm {arm['name']!r} has no target_nll with replicates for {missing[0]}")
    share = w / w.sum()
    return {"mean": float(sum(s * f["mean"] for s, f in zip(share, figures, strict=True))),
            "replicates": sum(s * f["_replicates"] for s, f in zip(share, figures, strict=True)),
            "seeds": len(figures[0]["per_seed"])}


def proposal_gin(results: dict) -> str:
    """The proposal as gin: a macro with the weights (for experiments) and a declared mixture (for `mtp train`)."""
    mixture, rates = results["mixture"], results["proposal"]["rates"]
    weights = "{" + ", ".join(f'"{t}": {r:.6f}' for t, r in rates.items()) + "}"
    tasks = "[" + ", ".join(f'"{t}"' for t in rates) + "]"
    return (f"# Rates proposed by `mtp mixture search {mixture}` (model {results['model']}, cross-validated "
            f"Spearman {_fmt(results['spearman'])} over {len(results['proxy'])} proxy runs; predicted target "
            f"{results['proposal']['predicted_target']:.4f}).\n"
            f"# Train on it: mtp train ... --gin_file=THIS_FILE --gin.MIXTURE_OR_TASK_NAME=\"'{mixture}_searched'\"\n"
            f"# In an experiment: mixing_strategies.extra = {{'searched': {{'strategy': 'explicit', "
            f"'weights': %{PROPOSAL_MACRO}}}}}\n"
            f"{PROPOSAL_MACRO} = {weights}\n"
            f"mixtures.declared = {{\"{mixture}_searched\": {{\"tasks\": {tasks}, \"strategy\": \"explicit\", "
            f"\"weights\": %{PROPOSAL_MACRO}}}}}\n")


def _fmt(value: float | None, digits: int = 3) -> str:
    return "undefined" if value is None else f"{value:.{digits}f}"


def _write(root: Path, results: dict) -> None:
    from mtplatform import checkpoints

    checkpoints.replace_text(root / "proposal.gin", proposal_gin(results))
    experiment.write_json(root / "results.json", results)
    checkpoints.replace_text(root / "results.md", markdown(results))
    plots(root, results)


def markdown(results: dict) -> str:
    """results.md: the fit, the proposal beside the fixed strategies, and the validation where there is one."""
    s = results["settings"]
    evaluated = results["evaluated"]
    lines = [f"# Mixture search: {results['mixture']}", "",
             f"{len(results['proxy'])} proxy runs of {s['steps']} steps, rates drawn from a Dirichlet around the "
             f"mixture's configured shares (concentration {s['concentration']:g}); each scored on held-out "
             f"`target_nll` ({s['eval_num_examples'] or 'all'} validation examples per task). Target: "
             + ", ".join(f"{w:g} x {t}" for t, w in results["target_weights"].items() if w) + " (normalised).", "",
             "## Fit (cross-validated on held-out proxy runs)", "",
             "| model | Spearman (target) | " + " | ".join(evaluated) + " |",
             "|---|---|" + "---|" * len(evaluated)]
    for model, fit in results["fits"].items():
        mark = "**" if model == results["model"] else ""
        lines.append(f"| {mark}{model}{mark} | {_fmt(fit['spearman'])} | "
                     + " | ".join(_fmt(fit["per_task"][t]) for t in evaluated) + " |")
    tasks = results["tasks"]
    lines += ["", f"Chosen: **{results['model']}** (highest Spearman on the target).", "",
              "## Proposal beside the fixed strategies (shares; predicted target)", "",
              "| mixture | " + " | ".join(tasks) + " | predicted target |", "|---|" + "---|" * (len(tasks) + 1)]
    rows = [("**proposed**", results["proposal"]), *results["strategies"].items()]
    for name, row in rows:
        lines.append(f"| {name} | " + " | ".join(f"{row['rates'][t]:.3f}" for t in tasks)
                     + f" | {row['predicted_target']:.4f} |")
    if results.get("validation"):
        lines += _validation_lines(results["validation"])
    lines += ["", "Plots: `predicted_vs_measured.png` (each proxy's target, predicted without it, against its "
              "measured target; and the validation arms where there are some), `rates.png` (proposed shares "
              "beside the fixed strategies')."]
    return "\n".join(lines) + "\n"


def _validation_lines(rows: list[dict]) -> list[str]:
    lines = ["", "## Validation: trained at the experiment's budget", "",
             "| arm | seeds | predicted target | measured target [95% CI] | minus searched [95% CI] | p |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ci = f"[{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}]" if r["ci95"] else ""
        if "p_value" in r:
            d = r["minus_searched_ci95"]
            versus = f"{r['minus_searched']:+.4f} [{d[0]:+.4f}, {d[1]:+.4f}] | {r['p_value']:.3f}"
        else:
            versus = "- | -"
        lines.append(f"| {r['arm']} | {r['seeds']} | {r['predicted_target']:.4f} | {r['measured_target']:.4f} {ci} "
                     f"| {versus} |")
    others = [r for r in rows if "p_value" in r]
    beaten = [r["arm"] for r in others if r["minus_searched"] > 0 and r["p_value"] < 0.05]
    worse = [r["arm"] for r in others if r["minus_searched"] < 0 and r["p_value"] < 0.05]
    rho = regression.spearman(np.array([r["predicted_target"] for r in rows]),
                              np.array([r["measured_target"] for r in rows]))
    lines += ["", f"The searched arm has a lower target than {len(beaten)} of {len(others)} fixed arms at 95% "
              f"({', '.join(beaten) or 'none'}), a higher one than {len(worse)} ({', '.join(worse) or 'none'}); "
              f"the rest are not told apart. Spearman's rho between predicted and measured targets over these arms: "
              f"{_fmt(rho)}."]
    return lines


def plots(root: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    proxies = results["proxy"]
    ax.scatter([p["cv_predicted_target"] for p in proxies], [p["measured_target"] for p in proxies], s=14,
               label=f"proxy runs (held out; Spearman {_fmt(results['spearman'], 2)})")
    for row in results.get("validation") or []:
        ax.scatter(row["predicted_target"], row["measured_target"], marker="s", color="tab:red")
        ax.annotate(row["arm"], (row["predicted_target"], row["measured_target"]), fontsize=7)
    ax.set_xlabel(f"predicted target ({results['model']})")
    ax.set_ylabel("measured target (mean target NLL)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "predicted_vs_measured.png", dpi=110)
    plt.close(fig)
    rows = {"proposed": results["proposal"], **results["strategies"]}
    tasks = results["tasks"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(tasks) * len(rows) / 4), 4))
    width = 0.8 / len(rows)
    for k, (name, row) in enumerate(rows.items()):
        ax.bar(np.arange(len(tasks)) + k * width, [row["rates"][t] for t in tasks], width, label=name)
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("share of examples")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "rates.png", dpi=110)
    plt.close(fig)
