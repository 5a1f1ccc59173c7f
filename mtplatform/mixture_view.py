"""`mtp mixture show`: a mixture's configured rates beside the shares measured in its real input pipeline.

Expected figures come from `mixing.resolve` (the strategy configured now); measured ones from drawing examples
through `data.train_dataset` exactly as training does (seqio's preprocessing, sampling by rate, packing), counting
each example by the task id it carries. A chi-square test says whether the measured counts fit the rates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from mtplatform import data, mixing


@dataclass(frozen=True)
class Measured:
    """Counts per task (in `resolved.rates` order) from a sample of the training stream."""

    examples: np.ndarray
    tokens: np.ndarray
    rows: int  # batch rows drawn (each a packed sequence when packing)

    @property
    def examples_per_row(self) -> float:
        return float(self.examples.sum()) / self.rows


def measure(mixture: str, task_feature_lengths: Mapping[str, int], num_examples: int, pack: bool = True,
            seed: int = 0, batch_size: int = 32, budget_rows: float | None = None,
            ) -> tuple[mixing.Resolved, Measured]:
    """Draw batches from the training pipeline until at least `num_examples` examples are counted."""
    ds, resolved = data.train_dataset(mixture_or_task_name=mixture, task_feature_lengths=task_feature_lengths,
                                      batch_size=batch_size, pack=pack, seed=seed, budget_rows=budget_rows)
    n = len(resolved.rates)
    examples, tokens, rows = np.zeros(n + 1), np.zeros(n + 1), 0
    for batch in ds.as_numpy_iterator():
        e, t = data.count_by_task(batch[data.TASK_IDS], batch.get("decoder_positions"), n)
        examples, tokens, rows = examples + e, tokens + t, rows + batch_size
        if examples.sum() >= num_examples:
            break
    return resolved, Measured(examples[1:], tokens[1:], rows)


def chi_square_p(resolved: mixing.Resolved, measured: Measured) -> float:
    """p-value of the measured example counts under the configured shares (tasks with share 0 left out)."""
    shares = np.array(list(resolved.shares.values()))
    keep = shares > 0
    observed = measured.examples[keep]
    expected = shares[keep] / shares[keep].sum() * observed.sum()
    if keep.sum() < 2:
        return 1.0
    return float(stats.chisquare(observed, expected).pvalue)


def table(resolved: mixing.Resolved, measured: Measured, steps: int | None, batch_size: int | None) -> str:
    """The Markdown table `mtp mixture show` prints."""
    shares = resolved.shares
    mean_len = np.divide(measured.tokens, measured.examples, out=np.full(len(shares), np.nan),
                         where=measured.examples > 0)
    expected_tokens = np.array(list(shares.values())) * mean_len
    expected_tokens = expected_tokens / np.nansum(expected_tokens)
    s = resolved.settings
    lines = [f"mixture {resolved.mixture}: strategy {s.strategy}, K {s.cap}, T {s.temperature}"
             + (f", max_epochs {s.max_epochs}, budget {s.budget_examples}" if s.initial.strategy == "unimax" else "")]
    if s.strategy == "online":
        lines.append(f"online ({s.online['algorithm']}): the rates below are where a run starts "
                     f"({s.online['initial']}); they move while it trains (rate/<task> in its metrics.jsonl)")
    lines += [f"dropped (no training data): {task}" for task in resolved.dropped]
    run = steps and batch_size
    epochs_head = f" epochs in {steps} x {batch_size} |" if run else ""
    lines += ["", "| task | train examples | rate | expected share | expected token share |" + epochs_head
              + " measured share | measured token share |",
              "|---|---:|---:|---:|---:|" + ("---:|" if run else "") + "---:|---:|"]
    per_step = (batch_size or 0) * measured.examples_per_row
    for i, (task, share) in enumerate(shares.items()):
        size = resolved.sizes[task]
        size_text = f"{size:,.0f}" + (" (artificial)" if task in mixing.UNSUPERVISED_TASKS else "")
        epochs = f" {steps * per_step * share / size:.2f} |" if run else ""
        if run and task in mixing.UNSUPERVISED_TASKS:
            epochs = " - |"  # an artificial size: epochs of a corpus are not counted in its lines
        lines.append(f"| {task} | {size_text} | {resolved.rates[task]:.4g} | {share:.2%} | "
                     f"{_pct(expected_tokens[i])} |{epochs} {measured.examples[i] / measured.examples.sum():.2%} | "
                     f"{measured.tokens[i] / measured.tokens.sum():.2%} |")
    lines += ["", f"measured on {int(measured.examples.sum()):,} examples in {measured.rows:,} rows "
                  f"({measured.examples_per_row:.2f} examples per row); chi-square test of the measured counts "
                  f"against the rates: p = {chi_square_p(resolved, measured):.3g}"]
    if run:
        lines.append(f"epochs assume {measured.examples_per_row:.2f} examples per row, as measured")
    return "\n".join(lines)


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.2%}"


def plot(resolved: mixing.Resolved, measured: Measured, path: str | Path) -> Path:
    """A bar chart (PNG) of configured against measured shares per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(resolved.shares)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4))
    ax.bar(x - 0.2, list(resolved.shares.values()), 0.4, label="configured rate")
    ax.bar(x + 0.2, measured.examples / measured.examples.sum(), 0.4,
           label=f"measured ({int(measured.examples.sum()):,} examples)")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("share of examples")
    ax.set_title(f"{resolved.mixture}: {resolved.settings.strategy}")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
