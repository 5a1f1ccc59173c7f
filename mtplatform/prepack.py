"""Linear layers that, while weights are held constant (`inference()`), multiply a few rows by a large weight
through a copy of it reordered once into oneDNN's blocked layout: what a decoding step does on a CPU.

Why: at a few rows, MKL's sgemm reads a weight at 4 to 8 GB/s on an AVX2 EPYC, and oneDNN reading the same weight
in its own layout is faster: 6.2 against 17.6 ms for 8 rows of the 32128 x 512 output layer, 0.24 against 0.35 ms
for a 1024 x 512 feed-forward weight read cold, 0.68 against 0.92 ms for 32 rows of an 8000 x 128 one. Below
about 2 MB of weight oneDNN's fixed cost per call (some 40 us) loses, and at thousands of rows (an encoder pass)
the two are even, so those stay `F.linear` (`LARGE`, `FEW_ROWS`). torch has no public call for it: these are the
operators inductor's CPU weight prepacking (`freezing`) emits, used here without compiling steps whose cache grows
with every position. Outside `inference()`, and on a GPU, under autocast, with gradients or without oneDNN, a layer
is `F.linear`, unchanged: training never takes this path.

A packed copy lives as long as the outermost `inference()`: the weights cannot change behind its back (an
optimizer step, a loaded checkpoint, FSDP gathering a parameter into reused memory).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

LARGE = 2**19  # elements of a weight worth packing (2 MB in fp32: T5-small's feed-forward and output layers)
FEW_ROWS = 256  # rows a packed weight multiplies at most: a decoding step's batch (times beams), not an encoder pass

_open = 0  # how many `inference()` scopes are open (they nest: decoding inside an evaluation)
# id(weight) -> (the weight, weakly; its version counter and address when packed; the packed copy). Keyed by id:
# a WeakKeyDictionary compares tensors with `==`. The weak reference tells a reused id from the same weight.
_PACKED: dict[int, tuple[weakref.ref, tuple[int, int], Tensor]] = {}


@contextlib.contextmanager
def inference() -> Iterator[None]:
    """A scope in which weights do not change: linear layers read packed copies, made on first use, dropped when
    the outermost scope closes."""
    global _open
    _open += 1
    try:
        yield
    finally:
        _open -= 1
        if not _open:
            _PACKED.clear()


@functools.cache  # asked at every layer of every step; the build does not change
def available() -> bool:
    """Whether this torch build has oneDNN and the prepacking operators."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def applies(x: Tensor, weight: Tensor) -> bool:
    """Whether `linear(x, weight)` reads a packed weight: inside `inference()`, a `LARGE` weight times at most
    `FEW_ROWS` rows, on the CPU, fp32 on both sides, no autocast, no gradients."""
    return (_open > 0 and weight.numel() >= LARGE and x.numel() <= FEW_ROWS * x.shape[-1]
            and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu") and available())


def packed(weight: Tensor, rows: int) -> Tensor:
    """`weight` in oneDNN's layout (`rows` is a hint of the rows it will multiply); packed again if it was
    changed in place inside the scope."""
    key = (weight._version, weight.data_ptr())
    hit = _PACKED.get(id(weight))
    if hit is None or hit[0]() is not weight or hit[1] != key:
        hit = (weakref.ref(weight), key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows))
        _PACKED[id(weight)] = hit
    return hit[2]


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """`F.linear(x, weight)` without bias; through the packed weight where `applies`, where values agree with
    `F.linear` to float rounding (another summation order), not bit for bit."""
    if not applies(x, weight):
        return F.linear(x, weight)
    rows = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(rows, packed(weight, rows.shape[0]), None, "none", [], "")
    return out.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """`nn.Linear` without bias, through `linear`: its state, initialisation and gradients are nn.Linear's."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight)
