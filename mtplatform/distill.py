"""Knowledge distillation: a teacher checkpoint trains a smaller student (`mtp distill`, `train.distillation`).

The student's loss per target token is

    alpha * cross-entropy(targets)  +  beta * T^2 * KL(teacher_T || student_T)  [+ hidden * MSE(hidden states)]

where `_T` are the decoder's output distributions at temperature T (Hinton et al.; DistilBERT's soft-target loss,
here on an encoder-decoder's decoder logits), and the optional hidden-state term is TinyBERT's: the mean squared
difference between each student layer's output and its teacher layer's (uniform mapping: student layer m of S to
teacher layer m * T / S, 1-based), through a learned linear map where the widths differ, over the encoder's input
tokens and the decoder's target tokens, summed over the layers. BERT's layer outputs come out of a LayerNorm; a
pre-norm T5's residual stream does not (its scale grows with depth, to hundreds), so both sides are first scaled to
unit root-mean-square per token, which is what the next block's RMSNorm reads of them. TinyBERT's attention-matrix
term is not implemented.

The student starts from scratch (`student_init = "scratch"`, its shape from the model gin file), from an initial
checkpoint (INITIAL_CHECKPOINT_PATH), or from the teacher itself (`"teacher_layers"`, DistilBERT: the student's
layer m is the teacher's layer m * T / S, every other one for half the layers; embeddings, norms, position biases
and the output projection copied; the widths must be the teacher's). The teacher runs in eval mode without
gradients; the learned projections are trained with the student and saved in its checkpoints (not in its weights:
an exported or evaluated student is a plain T5). The trainer (`train.py`) calls `Distiller.token_losses` instead of
the model's own; the per-task figures keep the student's cross-entropy, so that they compare with any other run.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import gin
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mtplatform import model as model_lib
from mtplatform import validation

STUDENT_INITS = ("scratch", "teacher_layers")
STACKS = ("encoder", "decoder")
TERMS = ("cross_entropy", "kl", "hidden")
"""The loss's terms, as metrics.jsonl logs them (`distill/<term>`, each a mean per target token, unweighted)."""
WIDTH_FIELDS = ("d_model", "d_kv", "d_ff", "num_heads", "feed_forward", "tie_word_embeddings", "vocab_size",
                "relative_attention_num_buckets", "relative_attention_max_distance", "embedding_dim")
"""What a student built from the teacher's layers must share with it (all but the layer counts)."""


@gin.configurable("distill")
@dataclass(frozen=True)
class DistillConfig:
    """A distillation's settings, bound as `distill.<field>` (gin/runs/distill.gin binds `teacher` to TEACHER)."""

    teacher: str = gin.REQUIRED
    alpha: float = 0.5
    beta: float = 0.5
    temperature: float = 2.0
    hidden: float = 0.0
    hidden_projection: bool = True
    student_init: str = "scratch"

    def __post_init__(self) -> None:
        validation.path_setting("distill.teacher (TEACHER)", self.teacher)
        for name in ("alpha", "beta", "hidden"):
            validation.number_in(f"distill.{name}", getattr(self, name), 0.0)
        validation.number_in("distill.temperature", self.temperature, 0.0, low_open=True)
        if self.alpha + self.beta + self.hidden == 0:
            raise ValueError("distill.alpha, distill.beta and distill.hidden are all 0: the student would learn "
                             "nothing (DistilBERT's soft targets: beta > 0)")
        if self.student_init not in STUDENT_INITS:
            raise ValueError(f"distill.student_init = {self.student_init!r}: must be one of "
                             f"{', '.join(STUDENT_INITS)}")
        if not isinstance(self.hidden_projection, bool):
            raise ValueError(f"distill.hidden_projection = {self.hidden_projection!r}: must be True or False")


def layer_map(student_layers: int, teacher_layers: int, setting: str) -> list[int]:
    """The teacher layer (0-based) each student layer learns from: TinyBERT's g(m) = m * T / S (1-based)."""
    if student_layers > teacher_layers:
        raise ValueError(f"{setting}: the student has {student_layers} layers in a stack, the teacher "
                         f"{teacher_layers}; each student layer needs a teacher layer of its own")
    return [(m + 1) * teacher_layers // student_layers - 1 for m in range(student_layers)]


def init_from_teacher(student: model_lib.T5, teacher: model_lib.T5) -> None:
    """DistilBERT's initialisation: `student` takes every other teacher layer (layer m from the teacher's
    m * T / S, 0-based) and everything outside the layers (embeddings, norms, position biases, output projection)."""
    differ = [f"{f} {getattr(student.cfg, f)!r} (the teacher's {getattr(teacher.cfg, f)!r})" for f in WIDTH_FIELDS
              if getattr(student.cfg, f) != getattr(teacher.cfg, f)]
    if differ:
        raise ValueError("distill.student_init = 'teacher_layers' needs the teacher's widths; the student has "
                         + "; ".join(differ))
    if student.cfg.shared_blocks is not None or teacher.cfg.shared_blocks is not None:
        raise ValueError("distill.student_init = 'teacher_layers' copies one block per layer; it cannot start "
                         "from or build a model with T5Config.shared_blocks")
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith(("encoder.", "decoder."))}
    for stack, layers in (("encoder", student.cfg.num_layers), ("decoder", student.cfg.num_decoder_layers)):
        teachers = len(getattr(teacher, stack))
        for m in range(layers):
            source = m * teachers // layers
            prefix = f"{stack}.{source}."
            state.update({f"{stack}.{m}.{k[len(prefix):]}": v for k, v in teacher.state_dict().items()
                          if k.startswith(prefix)})
    student.load_state_dict(state)


@contextmanager
def layer_outputs(model: model_lib.T5, enabled: bool = True) -> Iterator[dict[str, list[Tensor]]]:
    """Each layer's output, per stack, of the forward passes run inside (forward hooks: a block shared by several
    layers reports once per layer, in order); nothing where not `enabled`."""
    captured: dict[str, list[Tensor]] = {stack: [] for stack in STACKS}
    handles = [block.register_forward_hook(lambda _m, _i, out, s=stack: captured[s].append(out))
               for stack in STACKS for block in getattr(model, stack) if enabled]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Losses:
    """One micro-batch's losses: per target token (B, T) and, for the encoder's hidden states, a mean over its
    input tokens (a scalar; the trainer weighs it as if every target token carried it)."""

    total: Tensor
    cross_entropy: Tensor
    kl: Tensor
    hidden: Tensor | None
    encoder_hidden: Tensor | None
    hidden_weight: float = 0.0

    def weighted_sum(self, weights: Tensor) -> Tensor:
        """The micro-batch's loss: the token losses times their weights, summed (the trainer divides by the global
        batch's total weight), with the encoder's hidden-state term carried by every weighted target token."""
        loss = (self.total * weights).sum()
        if self.encoder_hidden is not None:
            loss = loss + self.hidden_weight * self.encoder_hidden * weights.sum()
        return loss


class Distiller:
    """The teacher, the settings, and the learned projections of the hidden-state term (`parameters()`, trained
    with the student and saved in its checkpoints by `state_dict`)."""

    def __init__(self, config: DistillConfig, teacher: model_lib.T5, student: model_lib.T5):
        self.config = config
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        if teacher.cfg.vocab_size != student.cfg.vocab_size:
            raise ValueError(f"distill.teacher={config.teacher}: its output layer has {teacher.cfg.vocab_size:,} "
                             f"ids, the student's {student.cfg.vocab_size:,}; distillation compares the two "
                             "distributions id by id")
        self.maps: dict[str, list[int]] = {}
        self.projections = nn.ModuleDict()
        if config.hidden:
            self._hidden_setup(student)

    def _hidden_setup(self, student: model_lib.T5) -> None:
        s, t = student.cfg, self.teacher.cfg
        self.maps = {"encoder": layer_map(s.num_layers, t.num_layers, "distill.hidden (encoder)"),
                     "decoder": layer_map(s.num_decoder_layers, t.num_decoder_layers, "distill.hidden (decoder)")}
        if s.d_model == t.d_model:
            return
        if not self.config.hidden_projection:
            raise ValueError(f"distill.hidden > 0 compares hidden states of width {s.d_model} (student) and "
                             f"{t.d_model} (teacher): set distill.hidden_projection = True to learn a map between "
                             "them (TinyBERT's W_h)")
        for stack in STACKS:  # TinyBERT: one map for all layers; here one per stack
            self.projections[stack] = nn.Linear(s.d_model, t.d_model, bias=False)
            nn.init.normal_(self.projections[stack].weight, std=s.d_model**-0.5)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.projections.parameters())

    def to(self, device: torch.device) -> Distiller:
        self.teacher.to(device)
        self.projections.to(device)
        return self

    def state_dict(self) -> dict[str, Tensor]:
        return self.projections.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.projections.load_state_dict(state)

    def token_losses(self, student: model_lib.T5, batch: dict[str, Tensor], z_loss: float,
                     forward: nn.Module | None = None) -> Losses:
        """The student's losses on `batch` (`forward`: the student's wrapper to call, as in `T5.token_losses`)."""
        c = self.config
        with layer_outputs(student, bool(c.hidden)) as student_states:
            student_logits = (forward if forward is not None else student)(**batch).float()
        cross_entropy, _ = student.losses_of(student_logits, batch, z_loss)
        with torch.no_grad(), layer_outputs(self.teacher, bool(c.hidden)) as teacher_states:
            teacher_logits = self.teacher(**batch).float()
        kl = soft_target_kl(teacher_logits, student_logits, c.temperature)
        total = c.alpha * cross_entropy + c.beta * c.temperature**2 * kl
        hidden = encoder_hidden = None
        if c.hidden:
            hidden, encoder_hidden = self._hidden_losses(batch, student_states, teacher_states)
            total = total + c.hidden * hidden
        return Losses(total, cross_entropy, kl, hidden, encoder_hidden, c.hidden)

    def _hidden_losses(self, batch: dict[str, Tensor], student: dict[str, list[Tensor]],
                       teacher: dict[str, list[Tensor]]) -> tuple[Tensor, Tensor]:
        """(decoder's per-target-token MSE summed over layers, encoder's mean over input tokens of the same)."""
        out = {}
        for stack in STACKS:
            project = self.projections[stack] if stack in self.projections else nn.Identity()
            out[stack] = sum(F.mse_loss(_unit_rms(project(student[stack][m].float())),
                                        _unit_rms(teacher[stack][t].float()), reduction="none").mean(-1)
                             for m, t in enumerate(self.maps[stack]))
        real = (batch["encoder_input_tokens"] != 0).float()
        return out["decoder"], (out["encoder"] * real).sum() / real.sum().clamp_min(1.0)


def _unit_rms(x: Tensor) -> Tensor:
    """`x` scaled to unit root-mean-square over its features: what the next pre-norm block reads of it."""
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)


def soft_target_kl(teacher_logits: Tensor, student_logits: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) per position (B, T) between the two softmaxes at `temperature`."""
    teacher_log = F.log_softmax(teacher_logits / temperature, dim=-1)
    student_log = F.log_softmax(student_logits / temperature, dim=-1)
    return (teacher_log.exp() * (teacher_log - student_log)).sum(-1)


class TermMeter:
    """The loss's terms summed over target tokens since the last log (saved with each checkpoint), for
    metrics.jsonl's `distill/<term>`: each the mean per target token of the window, before its weight."""

    def __init__(self, hidden: bool, state: dict | None = None):
        self.terms = TERMS if hidden else TERMS[:2]
        self.sums = dict.fromkeys((*self.terms, "weight"), 0.0) | (state or {})

    def add(self, losses: Losses, weights: Tensor) -> None:
        w = weights.to(losses.cross_entropy.device)
        self.sums["cross_entropy"] += (losses.cross_entropy.detach() * w).sum().item()
        self.sums["kl"] += (losses.kl.detach() * w).sum().item()
        if losses.hidden is not None:
            hidden = losses.hidden.detach() * w
            self.sums["hidden"] += hidden.sum().item() + losses.encoder_hidden.detach().item() * w.sum().item()
        self.sums["weight"] += w.sum().item()

    def log_values(self, summed: dict[str, float], new_window: bool) -> dict[str, float]:
        """`summed`: this window's sums over processes (`sums` of every process added)."""
        weight = summed["weight"]
        values = {f"distill/{t}": summed[t] / weight for t in self.terms if weight and math.isfinite(summed[t])}
        if new_window:
            self.sums = dict.fromkeys(self.sums, 0.0)
        return values

