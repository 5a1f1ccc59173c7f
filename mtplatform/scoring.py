"""Teacher-forced scoring: each example's target negative log-likelihood, and rank classification over a task's
closed label set. No decoding.

Small models sit at the constant-prediction baseline on decoded scores long before their loss stops moving; work
that ranks mixtures and strategies with small runs (RegMix, Data Mixing Laws, DataDecide) ranks on held-out loss.
`target_nll` is the mean negative log-likelihood per target token (nats, EOS included, as training counts it).
For a task registered with its labels (`register_labels`: GLUE's classes, NSP's), every label is scored as the
target of every example, as T5's rank classification does: `label_accuracy` is how often the gold label is the
most likely, `gold_label_logprob` the gold label's log-probability renormalised over the label set (the rank
classifier's negative cross-entropy: 0 is certain and right, log(1/K) is chance for K labels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mtplatform import precision as precision_lib

LABELS: dict[str, tuple[str, ...]] = {}
"""Task name -> its closed label set (the target texts a prediction can be), for rank classification."""


def register_labels(task_name: str, labels: Sequence[str]) -> None:
    """Declare that `task_name`'s targets are one of `labels` (at least two distinct texts)."""
    labels = tuple(labels)
    if len(set(labels)) < 2 or len(set(labels)) != len(labels):
        raise ValueError(f"task {task_name}: a label set needs two or more distinct labels, got {list(labels)}")
    LABELS[task_name] = labels


@dataclass
class Scores:
    """Per-example teacher-forced figures, in the evaluation's example order."""

    nll_sum: np.ndarray  # (n,) summed negative log-likelihood of the target tokens, nats
    tokens: np.ndarray  # (n,) target tokens scored (EOS included)
    label_logprobs: np.ndarray | None = None  # (n, K) log p(label k | inputs), each label's whole sequence
    gold: np.ndarray | None = None  # (n,) index of the gold label

    def metrics(self) -> dict[str, float]:
        """The task-level figures: target_nll, and label_accuracy and gold_label_logprob where labels exist."""
        out = {"target_nll": float(self.nll_sum.sum() / max(1.0, self.tokens.sum()))}
        if self.label_logprobs is not None:
            out["label_accuracy"] = float(100.0 * self.label_correct().mean())
            out["gold_label_logprob"] = float(self.gold_label_logprob().mean())
        return out

    def label_correct(self) -> np.ndarray:
        return (self.label_logprobs.argmax(axis=1) == self.gold).astype(np.float64)

    def gold_label_logprob(self) -> np.ndarray:
        normalised = self.label_logprobs - np.logaddexp.reduce(self.label_logprobs, axis=1, keepdims=True)
        return normalised[np.arange(len(self.gold)), self.gold]


def _sequence_logprobs(model, memory: torch.Tensor, enc: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) summed log p(targets | inputs); targets are (B, T) ids padded with 0 after EOS."""
    decoder_inputs = F.pad(targets[:, :-1], (1, 0))  # T5 starts decoding from id 0
    logits = model.decode(decoder_inputs, memory, enc).float()
    token_logprobs = -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return (token_logprobs * (targets != 0)).sum(dim=1)


def _label_of(targets: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
    """(B,) the label each target is, token for token (its padding included), or None unless every target is one:
    then the target's log-likelihood is its label's, and the teacher-forced pass need not run twice."""
    if labels is None or labels.shape[1] > targets.shape[1]:
        return None
    padded = F.pad(labels, (0, targets.shape[1] - labels.shape[1]))
    same = (targets[:, None, :] == padded[None]).all(-1)  # (B, K)
    return same.int().argmax(1) if bool(same.any(1).all()) else None


@torch.no_grad()
def score(model, dataset, batch_size: int, label_ids: Sequence[Sequence[int]] | None = None,
          gold: Sequence[int] | None = None, precision: str = "fp32",
          device: torch.device | str = "cpu") -> Scores:
    """Teacher-forced figures of `model` on a seqio evaluation dataset of (index, EncDecFeatureConverter features),
    as `seqio.Evaluator.cached_model_datasets` holds it. `label_ids` are the labels' token ids (EOS included);
    `gold` each example's label index."""
    was_training = model.training
    model.eval()
    nll, tokens, label_lp, order = [], [], [], []
    labels = None
    if label_ids:
        width = max(map(len, label_ids))
        labels = torch.tensor([list(ids) + [0] * (width - len(ids)) for ids in label_ids], device=device)
    try:
        for indices, features in dataset.batch(batch_size).as_numpy_iterator():
            enc = torch.tensor(features["encoder_input_tokens"], device=device)
            targets = torch.tensor(features["decoder_target_tokens"], device=device).long()
            with precision_lib.autocast(precision, device):
                memory = model.encode(enc)
                per_label = None
                if labels is not None:
                    per_label = torch.stack([_sequence_logprobs(model, memory, enc, label.expand(len(enc), -1))
                                             for label in labels], dim=1)
                    label_lp.append(per_label.cpu())
                which = _label_of(targets, labels)
                if which is not None:  # every target is a label: its pass above was the target's own
                    nll.append(-per_label.gather(1, which[:, None]).squeeze(1).cpu())
                else:
                    nll.append(-_sequence_logprobs(model, memory, enc, targets).cpu())
            tokens.append((targets != 0).sum(dim=1).cpu())
            order.append(indices)
    finally:
        model.train(was_training)
    ranked = np.argsort(np.concatenate(order), kind="stable")  # seqio's example order, as its predictions have
    out = Scores(torch.cat(nll).double().numpy()[ranked], torch.cat(tokens).double().numpy()[ranked])
    if labels is not None:
        out.label_logprobs = torch.cat(label_lp).double().numpy()[ranked]
        out.gold = np.asarray(gold, dtype=np.int64)
    return out
