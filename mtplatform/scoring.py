"""Teacher-forced scoring: each example's target negative log-likelihood, and rank classification over a task's
closed label set. No decoding.

Small models sit at the constant-prediction baseline on decoded scores long before their loss stops moving; work
that ranks mixtures and strategies with small runs (RegMix, Data Mixing Laws, DataDecide) ranks on held-out loss.
`target_nll` is the mean negative log-likelihood per target token (nats, EOS included, as training counts it).
For a task registered with its labels (`catalog.register_labels`: GLUE's classes, NSP's), every label is scored as the
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

from mtplatform import length_batches
from mtplatform import precision as precision_lib


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


def _sequence_logprobs(model, memory: torch.Tensor, enc: torch.Tensor, targets: torch.Tensor,
                       cross: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """(B,) summed log p(targets | inputs); targets are (B, T) ids padded with 0 after EOS."""
    decoder_inputs = F.pad(targets[:, :-1], (1, 0))  # T5 starts decoding from id 0
    logits = model.decode(decoder_inputs, memory, enc, cross=cross).float()
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


class Scorer:
    """Teacher-forced figures gathered batch by batch, in whatever order the batches come.

    The decoding loop of an evaluation feeds it (`evaluate.make_predict_fn`) with the encoder's output and the
    cross-attention keys and values it computed for decoding: the inputs are encoded once for both, and the label
    passes cost only the decoder over a few target positions. `score` feeds it alone, where nothing is decoded.
    `label_ids` are the labels' token ids (EOS included); `gold` each example's label index.
    """

    def __init__(self, model, label_ids: Sequence[Sequence[int]] | None = None, gold: Sequence[int] | None = None,
                 device: torch.device | str = "cpu"):
        self.model, self.device, self.gold = model, device, gold
        self.labels = None
        if label_ids:
            width = max(map(len, label_ids))
            self.labels = torch.tensor([list(ids) + [0] * (width - len(ids)) for ids in label_ids], device=device)
        self.nll, self.tokens, self.label_lp, self.order = [], [], [], []

    @torch.no_grad()
    def add(self, indices: np.ndarray, features: dict[str, np.ndarray], memory: torch.Tensor | None = None,
            cross: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        """Score one batch of (index, EncDecFeatureConverter features); `memory` and `cross`: the model's
        `encode` and `cross_keys_values` of its inputs where the caller has them (else computed here). Runs under
        the caller's autocast, in the model's current mode."""
        model = self.model
        enc = torch.as_tensor(features["encoder_input_tokens"], device=self.device)
        targets = torch.as_tensor(features["decoder_target_tokens"], device=self.device).long()
        if memory is None:
            memory = model.encode(enc)
        if cross is None:
            cross = model.cross_keys_values(memory)
        per_label = None
        if self.labels is not None:
            per_label = torch.stack([_sequence_logprobs(model, memory, enc, label.expand(len(enc), -1), cross)
                                     for label in self.labels], dim=1)
            self.label_lp.append(per_label.cpu())
        which = _label_of(targets, self.labels)
        if which is not None:  # every target is a label: its pass above was the target's own
            self.nll.append(-per_label.gather(1, which[:, None]).squeeze(1).cpu())
        else:
            self.nll.append(-_sequence_logprobs(model, memory, enc, targets, cross).cpu())
        self.tokens.append((targets != 0).sum(dim=1).cpu())
        self.order.append(np.asarray(indices))

    def result(self) -> Scores:
        """The figures in seqio's example order (as its predictions have), each example scored exactly once."""
        if not self.nll:
            return Scores(np.zeros(0), np.zeros(0))
        order = np.concatenate(self.order)
        if not np.array_equal(np.sort(order), np.arange(len(order))):
            raise RuntimeError(f"scoring saw examples {sorted(order.tolist())[:10]}...: not each of 0..{len(order) - 1}"
                               " once (was the evaluation's predict function called twice?)")
        ranked = np.argsort(order, kind="stable")
        out = Scores(torch.cat(self.nll).double().numpy()[ranked], torch.cat(self.tokens).double().numpy()[ranked])
        if self.labels is not None:
            out.label_logprobs = torch.cat(self.label_lp).double().numpy()[ranked]
            out.gold = np.asarray(self.gold, dtype=np.int64)
        return out


@torch.no_grad()
def score(model, dataset, batch_size: int, label_ids: Sequence[Sequence[int]] | None = None,
          gold: Sequence[int] | None = None, precision: str = "fp32",
          device: torch.device | str = "cpu", by_length: bool = True) -> Scores:
    """Teacher-forced figures of `model` on a seqio evaluation dataset of (index, EncDecFeatureConverter features),
    as `seqio.Evaluator.cached_model_datasets` holds it, where nothing is decoded (see `Scorer`); in batches by
    length where `by_length` (`length_batches`)."""
    scorer = Scorer(model, label_ids, gold, device)
    was_training = model.training
    model.eval()
    try:
        for indices, features in length_batches.batches(dataset, batch_size, by_length):
            with precision_lib.autocast(precision, device):
                scorer.add(indices, features)
    finally:
        model.train(was_training)
    return scorer.result()
