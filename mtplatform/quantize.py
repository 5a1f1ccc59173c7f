"""int8 inference: PyTorch's dynamic quantization of a model's linear layers (`torch.ao.quantization`).

Each `nn.Linear`'s weight is stored as int8 with one scale per output row, and its input is quantized per batch at
run time (Q8BERT's and PyTorch's BERT tutorial's recipe: about 2.4x smaller, faster on one CPU thread, scores nearly
unchanged). Embeddings, norms and the attention's position bias stay in fp32. The kernels are the CPU's (fbgemm on
x86, qnnpack on ARM), so a quantized model runs on the CPU in fp32 around its int8 products: `mtp eval` and
`mtp infer` with `--quantize=int8` evaluate on the CPU whatever the machine has. torch 2.13 warns that its quantized
tensor types will be removed in a later release (torchao is their successor); torch is pinned here.
"""

from __future__ import annotations

import copy
import io

import torch
import torch.nn as nn

from mtplatform import prepack

CHOICES = ("int8",)


def check(setting: str, quantize: str | None, precision: str) -> None:
    """A one-line error for an unknown `quantize`, or for int8 asked to run in another precision than fp32."""
    if quantize is None:
        return
    if quantize not in CHOICES:
        raise ValueError(f"{setting} = {quantize!r}: must be one of {', '.join(CHOICES)} (or None: no quantization)")
    if precision not in ("auto", "fp32"):
        raise ValueError(f"{setting} = {quantize!r} computes in fp32 around its int8 products; precision "
                         f"{precision!r} cannot apply (set precision to 'auto' or 'fp32')")


def int8(model: nn.Module) -> nn.Module:
    """`model` (in eval mode, on the CPU) with every `nn.Linear` dynamically quantized to int8 weights."""
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"int8 quantization: PyTorch's dynamic int8 kernels run on the CPU, and the model is on "
                         f"{device}; load it on the CPU (`mtp eval --quantize=int8` does)")
    model = copy.deepcopy(model).eval()
    for m in model.modules():  # torch's quantizer maps exactly nn.Linear; prepack.Linear adds behaviour, no state
        if type(m) is prepack.Linear:
            m.__class__ = nn.Linear
    return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)


def quantized_linears(model: nn.Module) -> int:
    """How many of `model`'s linear layers hold int8 weights."""
    return sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.modules())


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as `torch.save` writes them (int8 and fp32 alike): its size on disk."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes
