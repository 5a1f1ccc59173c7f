"""Linear layers that, while weights are held constant (`inference()`), multiply a few rows by a large weight
through a copy of it reordered once into oneDNN's blocked layout: what a decoding step does on a CPU.

Why: at a few rows, MKL's sgemm reads a weight at 4 to 8 GB/s on an AVX2 EPYC, and oneDNN reading the same weight
in its own layout is faster: 6.2 against 17.6 ms for 8 rows of the 32128 x 512 output layer, 0.24 against 0.35 ms
for a 1024 x 512 feed-forward weight read cold, 0.68 against 0.92 ms for 32 rows of an 8000 x 128 one. Below
about 2 MB of weight oneDNN's fixed cost per call (some 40 us) loses, and at thousands of rows (an encoder pass)
the two are even, so those stay `F.linear` (`LARGE`, `FEW_ROWS`). Under bf16 autocast on a CPU (where bf16 is
native: `precision="auto"`), a layer reads a packed bf16 copy of its weight, whatever its size: on an AMX CPU,
19 against 32 us for 8 rows of a 384 x 512 weight (autocast's cached cast, then MKL), 0.77 against 1.23 ms for the
32128 x 512 output layer, and never slower down to 64 x 64; the values are the same bits as autocast's. torch has
no public call for it: these are the operators inductor's CPU weight prepacking (`freezing`) emits, used here
without compiling steps whose cache grows with every position. Outside `inference()`, on a GPU, under another
autocast dtype, with gradients or without oneDNN, a layer is `F.linear`, unchanged: training never takes this
path.

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
# (id(weight), dtype) -> (the weight, weakly; its version counter and address when packed; the packed copy). Keyed
# by id: a WeakKeyDictionary compares tensors with `==`. The weak reference tells a reused id from the same weight.
_PACKED: dict[tuple[int, torch.dtype], tuple[weakref.ref, tuple[int, int], Tensor]] = {}


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


@functools.cache
def available_bf16() -> bool:
    """Whether oneDNN packs bf16 weights on this CPU (it needs AVX512BW/VL/DQ or AVX-NE-CONVERT; bf16 autocast on
    an AVX2-only CPU, emulated and slow, keeps F.linear)."""
    return available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def applies(x: Tensor, weight: Tensor) -> bool:
    """Whether `linear(x, weight)` reads a packed weight: inside `inference()`, at most `FEW_ROWS` rows, on the
    CPU, an fp32 weight, no gradients; and either bf16 autocast where oneDNN packs bf16 (any weight) or no
    autocast, an fp32 `x` and a `LARGE` weight."""
    if not (_open > 0 and x.numel() <= FEW_ROWS * x.shape[-1] and x.device.type == "cpu"
            and weight.dtype == torch.float32 and not torch.is_grad_enabled() and available()):
        return False
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu") == torch.bfloat16 and available_bf16()
    return x.dtype == torch.float32 and weight.numel() >= LARGE


def packed(weight: Tensor, rows: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """`weight` as `dtype` in oneDNN's layout (`rows` is a hint of the rows it will multiply); packed again if
    it was changed in place inside the scope."""
    key = (weight._version, weight.data_ptr())
    hit = _PACKED.get((id(weight), dtype))
    if hit is None or hit[0]() is not weight or hit[1] != key:
        hit = (weakref.ref(weight), key, torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype), rows))
        _PACKED[(id(weight), dtype)] = hit
    return hit[2]


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """`F.linear(x, weight)` without bias; through the packed weight where `applies`, where values agree with
    `F.linear` to float rounding (another summation order), not bit for bit; in bf16, the dtype autocast gives."""
    if not applies(x, weight):
        return F.linear(x, weight)
    dtype = torch.bfloat16 if torch.is_autocast_enabled("cpu") else torch.float32
    rows = x.reshape(-1, x.shape[-1]).to(dtype)
    out = torch.ops.mkldnn._linear_pointwise(rows, packed(weight, rows.shape[0], dtype), None, "none", [], "")
    return out.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """`nn.Linear` without bias, through `linear`: its state, initialisation and gradients are nn.Linear's."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight)
