"""Which of PyTorch's attention kernels serves T5's attention in training, and what each costs.

T5 adds a learned position bias to the attention scores, so `F.scaled_dot_product_attention` gets an additive mask
that needs a gradient (the bias's), in the shape (batch, heads, queries, keys). Flash attention takes no mask; the
memory-efficient, cuDNN and math kernels do. This times forward + backward of one encoder self-attention (T5 1.1
small: 6 heads of 64, inputs 512) through each kernel that accepts it, with the mask built as the model builds it
(the model's own position bias, which needs a gradient, plus the padding mask, which does not), prints the mask's
layout and which kernel PyTorch picks when left to choose.

    python benchmarks/attention_backends.py [--batch 64] [--length 512] [--dtype bf16] [--device auto] [--packed]
"""

from __future__ import annotations

import argparse
import contextlib

import harness  # benchmarks/harness.py: Python puts the script's directory first on the path
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mtplatform import precision
from mtplatform.model import RelativePositionBias, T5Config, _attention_bias

BACKENDS = {"default": None, "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "math": SDPBackend.MATH}


def inputs(batch: int, length: int, packed: bool, on: torch.device) -> tuple:
    """q, k, v and the T5 pieces of the mask: the model's relative position bias and which keys each query sees
    (padding of random length; packed: positions restart in each row's second half, as a packed row's do)."""
    g = torch.Generator(on).manual_seed(0)
    q, k, v = (torch.randn(batch, 6, length, 64, device=on, generator=g, requires_grad=True) for _ in range(3))
    position_bias = RelativePositionBias(T5Config(num_heads=6), bidirectional=True).to(on)
    positions = torch.arange(length, device=on)[None]
    if packed:
        positions = (positions % (length // 2)).expand(batch, -1)
    lengths = torch.randint(length // 2, length + 1, (batch, 1, 1), device=on, generator=g)
    real = torch.arange(length, device=on)[None, None, :] < lengths
    return q, k, v, position_bias, positions, real.expand(-1, length, -1)


def fwd_bwd(q, k, v, position_bias, positions, allowed) -> None:
    """One attention as `T5.encode` computes it (under the caller's autocast), forward and backward."""
    bias = _attention_bias(allowed, position_bias(positions, positions))
    dtype = bias.dtype
    out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=bias, scale=1.0)
    out.float().square().mean().backward()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--packed", action="store_true",
                   help="a bias per row, from positions that restart mid-row (since 31783c2 the model takes this "
                        "path only for positions that do not count up by one per segment; seqio's do)")
    args = p.parse_args()
    on = harness.device(args.device)
    print(f"machine: {harness.machine()}")
    print(f"one attention, forward + backward: batch {args.batch}, 6 heads of 64, {args.length} queries and keys, "
          f"{args.dtype}, {'packed' if args.packed else 'unpacked'} positions, on {on.type}")
    tensors = inputs(args.batch, args.length, args.packed, on)
    autocast = precision.autocast(args.dtype, on)
    if on.type == "cuda":
        with autocast:
            bias = _attention_bias(tensors[5], tensors[3](tensors[4], tensors[4]))
        q, k, v = (t.to(bias.dtype) for t in tensors[:3])
        print(f"mask: shape {tuple(bias.shape)}, strides {bias.stride()}, {bias.dtype}")
        print(f"default choice: {SDPBackend(torch._fused_sdp_choice(q, k, v, bias, 0.0, False, scale=1.0)).name}")
        params = torch.backends.cuda.SDPAParams(q, k, v, bias, 0.0, False, False)
        for name, check in (("efficient", torch.backends.cuda.can_use_efficient_attention),
                            ("cudnn", torch.backends.cuda.can_use_cudnn_attention)):
            print(f"can use {name}: {check(params, True)}")
    for name, backend in BACKENDS.items():
        context = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
        try:
            with context, autocast:
                seconds = harness.time_steps(lambda: fwd_bwd(*tensors), 2, args.steps, on)
        except RuntimeError as error:
            print(f"{name:>9}: not available ({str(error).splitlines()[0][:150]})")
            continue
        ms = sorted(seconds)[len(seconds) // 2] * 1e3
        print(f"{name:>9}: {ms:8.2f} ms median forward + backward")


if __name__ == "__main__":
    main()
