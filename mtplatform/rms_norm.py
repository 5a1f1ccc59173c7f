"""T5's layer norm (RMSNorm: scale only, no mean, no bias) computed in fp32, its output in the dtype the caller
computes in, with a backward pass of fewer passes over memory on a CPU.

Why not `F.rms_norm` alone: on a CPU its forward is one fused kernel, but its backward is the autograd of its
decomposition (the square, the mean, the reciprocal root, two products), about ten passes over the (tokens, d_model)
activations; in a bf16 training step of T5-small (batch 8, 512/114, 2 cores) its 42 norms' backward passes were a
tenth of the step. Here the backward is the closed form, in seven passes:

    xhat = x * rstd,   dw = sum_rows(g * xhat),   dx = rstd * (g * w - xhat * mean(g * w * xhat))

with `mean(g * w * xhat)` a matrix-vector product of `g * xhat` and `w` instead of another pass. The forward pass is
`F.rms_norm`'s arithmetic (the same bits; `F.rms_norm` plus a separate reduction for the reciprocal root was slower:
1.57-1.58 against 1.50-1.57 s). A T5-small bf16 step: 1.528, 1.511, 1.532 s against 1.608, 1.596, 1.558 s (three
alternating pairs, 9 steps each after 3 of warm-up; AMX CPU). Without gradients (evaluation, decoding) and on a GPU,
`F.rms_norm` alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """x / sqrt(mean(x**2) + eps) * weight over the last dimension, computed in fp32, returned in `dtype`."""
    if x.device.type == "cpu" and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNorm.apply(x, weight, eps, dtype)
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            xf = x.float()
            rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(eps))
            out = (xf * rstd).mul_(weight.float()).to(dtype)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        x, weight, rstd = ctx.saved_tensors
        w = weight.float()
        with torch.autocast(x.device.type, enabled=False):
            xhat = x.float() * rstd
            g_xhat = grad * xhat  # fp32 (grad may be bf16)
            dw = g_xhat.reshape(-1, x.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
            dx = None
            if ctx.needs_input_grad[0]:
                mean = torch.matmul(g_xhat, w).unsqueeze(-1).div_(x.shape[-1])  # mean(g * w * xhat) per row
                dx = torch.addcmul(grad * w, xhat, mean, value=-1).mul_(rstd).to(x.dtype)
        return dx, (dw.to(weight.dtype) if dw is not None else None), None, None
