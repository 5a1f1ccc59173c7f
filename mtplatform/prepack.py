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

`linears` multiplies layers that read the same input (a decoding step's q, k, v; wi_0 and wi_1) through one packed
copy of their weights stacked: one call's fixed cost instead of several.

A packed copy lives as long as the outermost `inference()`: the weights cannot change behind its back (an
optimizer step, a loaded checkpoint, FSDP gathering a parameter into reused memory).

Under `torch.compile` (a compiled decoding step, `decoding.compiled_step`) the packed product is one opaque operator,
`mtplatform::packed_product`, that looks its packed copy up when it runs: inductor fuses what lies between the
products and the weights stay the graph's inputs, never constants, so a compiled step follows the weights as they
change between scopes (inductor's own `freezing` folds them in and would decode with stale ones).
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
# (ids of the weights, dtype) -> (the weights, weakly; their version counters and addresses when packed; the packed
# copy of them stacked). Keyed by id: a WeakKeyDictionary compares tensors with `==`. The weak references tell a
# reused id from the same weight.
_PACKED: dict[tuple[tuple[int, ...], torch.dtype],
              tuple[tuple[weakref.ref, ...], tuple[tuple[int, int], ...], Tensor]] = {}


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


def available() -> bool:
    """Whether this torch build has oneDNN and the prepacking operators."""
    return _builds()[0]


def available_bf16() -> bool:
    """Whether oneDNN packs bf16 weights on this CPU (it needs AVX512BW/VL/DQ or AVX-NE-CONVERT; bf16 autocast on
    an AVX2-only CPU, emulated and slow, keeps F.linear)."""
    return _builds()[1]


@functools.cache  # asked at every layer of every step; the build does not change. Behind the two above,
def _builds() -> tuple[bool, bool]:  # constants of compiled steps: dynamo would trace into a cached function
    """(`available`, `available_bf16`)."""
    ops = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    return ops, ops and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def applies(x: Tensor, *weights: Tensor) -> bool:
    """Whether `linear(x, weight)` (`linears(x, weights)`) reads a packed weight: inside `inference()`, at most
    `FEW_ROWS` rows, on the CPU, fp32 weights, no gradients; and either bf16 autocast where oneDNN packs bf16 (any
    weight) or no autocast, an fp32 `x` and `LARGE` weights (together)."""
    # While tracing a compiled step, `_open` is not read (the trace would depend on its value): the step runs only
    # inside a scope (`decoding.generate`), and the operator it calls checks again (`_product`).
    if not ((torch.compiler.is_compiling() or _open > 0) and x.numel() <= FEW_ROWS * x.shape[-1]
            and x.device.type == "cpu" and all(w.dtype == torch.float32 for w in weights)
            and not torch.is_grad_enabled() and available()):
        return False
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu") == torch.bfloat16 and available_bf16()
    return x.dtype == torch.float32 and sum(w.numel() for w in weights) >= LARGE


def packed(weights: tuple[Tensor, ...], rows: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """`weights` stacked (their output rows one after another) as `dtype` in oneDNN's layout (`rows` is a hint of
    the rows it will multiply); packed again if one was changed in place inside the scope."""
    ids = tuple(id(w) for w in weights)
    key = tuple((w._version, w.data_ptr()) for w in weights)
    hit = _PACKED.get((ids, dtype))
    if hit is None or hit[1] != key or any(ref() is not w for ref, w in zip(hit[0], weights, strict=True)):
        stacked = torch.cat([w.detach() for w in weights]) if len(weights) > 1 else weights[0].detach()
        hit = (tuple(weakref.ref(w) for w in weights), key,
               torch.ops.mkldnn._reorder_linear_weight(stacked.to(dtype), rows))
        _PACKED[(ids, dtype)] = hit
    return hit[2]


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """`F.linear(x, weight)` without bias; through the packed weight where `applies`, where values agree with
    `F.linear` to float rounding (another summation order), not bit for bit; in bf16, the dtype autocast gives."""
    if not applies(x, weight):
        return F.linear(x, weight)
    return _packed_product(x, (weight,))


def linears(x: Tensor, layers: tuple[nn.Module, ...]) -> list[Tensor]:
    """`[layer(x) for layer in layers]`; where they are all `Linear`s (not, say, int8 ones) and `applies` to their
    weights, one product through a packed copy of the weights stacked, the outputs views of one tensor.

    Why: a decoding step multiplies a few rows, and each oneDNN call costs some 40 us whatever its size; a decoder
    layer's self-attention q, k, v and a gated feed-forward's wi_0, wi_1 read the same input, so 3 and 2 calls
    become one each. In bf16 on the AVX512-BF16 EPYC (2 cores), 8 rows of T5-small's weights: q, k, v 82 against
    161 us, wi_0, wi_1 100 against 139 us; 64 greedy steps (batch 8, 512 inputs) 0.894 against 0.934 s and 0.943
    against 1.010 s (medians of 6, alternating in one process). The stack is packed once per `inference()` scope.
    """
    weights = tuple(layer.weight for layer in layers if type(layer) is Linear)
    if len(weights) < 2 or len(weights) < len(layers) or not applies(x, *weights):
        return [layer(x) for layer in layers]
    return list(_packed_product(x, weights).split([w.shape[0] for w in weights], -1))


def _packed_product(x: Tensor, weights: tuple[Tensor, ...]) -> Tensor:
    """x times the packed stack of `weights`, (..., their output rows summed): where `applies`. In bf16 where
    autocast is on: decided here, as a compiled graph runs without autocast (it traced autocast's casts)."""
    bf16 = torch.is_autocast_enabled("cpu")
    if torch.compiler.is_compiling():
        return torch.ops.mtplatform.packed_product(x, list(weights), bf16)
    return _product(x, weights, bf16)


def _product(x: Tensor, weights: tuple[Tensor, ...], bf16: bool) -> Tensor:
    """`_packed_product`'s work; outside `inference()` (a compiled step called outside `decoding.generate`),
    `F.linear` of the weights stacked, in the same dtype."""
    dtype = _dtype(bf16)
    rows = x.reshape(-1, x.shape[-1]).to(dtype)
    if _open:
        out = torch.ops.mkldnn._linear_pointwise(rows, packed(weights, rows.shape[0], dtype), None, "none", [], "")
    else:
        out = F.linear(rows, torch.cat(weights).to(dtype))
    return out.view(*x.shape[:-1], out.shape[-1])


# The operator is defined through `torch.library.Library`, not `torch.library.custom_op`: custom_op wraps every call
# in its own Python autograd and dispatch layers, some 50 us a call, and a compiled T5-small step makes 25 of them
# (37.3 against 34.9 ms a step on the AVX2 EPYC, alternating in one process). It has no gradient; `applies` never
# takes it with gradients on.
_LIBRARY = torch.library.Library("mtplatform", "DEF")
_LIBRARY.define("packed_product(Tensor x, Tensor[] weights, bool bf16) -> Tensor")


def _packed_product_op(x: Tensor, weights: list[Tensor], bf16: bool) -> Tensor:
    """`_product` as an operator a compiled graph calls without looking inside (packed copies are not tensors
    that inductor can take as inputs)."""
    return _product(x, tuple(weights), bf16)


_LIBRARY.impl("packed_product", _packed_product_op, "CPU")


@torch.library.register_fake("mtplatform::packed_product")
def _(x: Tensor, weights: list[Tensor], bf16: bool) -> Tensor:
    return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in weights)), dtype=_dtype(bf16))


def _dtype(bf16: bool) -> torch.dtype:
    """The dtype of `_product`'s output: the operator and its fake (what a compiled graph plans with) must agree."""
    return torch.bfloat16 if bf16 else torch.float32


class Linear(nn.Linear):
    """`nn.Linear` without bias, through `linear`: its state, initialisation and gradients are nn.Linear's."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight)
