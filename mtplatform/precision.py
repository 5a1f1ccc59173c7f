"""Which precision pays on this device: bf16 autocast only where the hardware multiplies bf16 natively.

On a CPU with AMX or AVX512-BF16, bf16 matrix products run several times faster than fp32. Without them (AVX2-only
CPUs, e.g. many AMD EPYC machines) PyTorch emulates bf16 and a T5 training step runs ~30x *slower* than in fp32, so
`precision="auto"` picks fp32 there.

`MTP_NATIVE_BF16=native` (or `not-native`) forces the answer of `native_bf16()`, so that anyone can run the test
suite, or a run, as the other kind of machine would: `auto` then resolves as it would there (bf16 on a machine
without native bf16 is emulated: correct, only slow).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

NATIVE_BF16_ENV = "MTP_NATIVE_BF16"
_FORCED = {"native": True, "1": True, "true": True, "yes": True,
           "not-native": False, "not native": False, "0": False, "false": False, "no": False}


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """True where bf16 matrix products are done in hardware (or where `MTP_NATIVE_BF16` says so)."""
    forced = os.environ.get(NATIVE_BF16_ENV, "").strip().lower()
    if forced:
        if forced not in _FORCED:
            raise ValueError(f"{NATIVE_BF16_ENV}={os.environ[NATIVE_BF16_ENV]!r}: use 'native' or 'not-native' "
                             "(or unset it to detect the hardware)")
        return _FORCED[forced]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_bf16_hardware() != "neither"


def cpu_bf16_hardware() -> str:
    """'AMX', 'AVX512-BF16' or 'neither': how this CPU multiplies bf16 in hardware (an older torch without the
    probes: 'neither', the conservative answer)."""
    return _probe_cpu()


@functools.cache  # behind `cpu_bf16_hardware`, a constant of compiled steps (`decoding.compiled_step`): dynamo
def _probe_cpu() -> str:  # would trace into a cached function, and warn
    try:
        if torch.cpu._is_amx_tile_supported():
            return "AMX"
        return "AVX512-BF16" if torch.cpu._is_avx512_bf16_supported() else "neither"
    except AttributeError:
        return "neither"


def amx() -> bool:
    """True where this CPU multiplies bf16 in AMX tiles. PyTorch's fused bf16 attention kernel decoded at 2.26x
    Hugging Face's there, and is several times slower than plain batched products where bf16 has only AVX512-BF16
    (`model.attend`)."""
    return cpu_bf16_hardware() == "AMX"


def resolve(precision: str, device: torch.device | str = "cpu") -> str:
    """'auto' -> 'bf16' where native, else 'fp32'; 'fp32' and 'bf16' pass through."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision={precision!r}: use 'auto', 'fp32' or 'bf16'")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(precision: str, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager:
    """The autocast context for a resolved precision."""
    device = torch.device(device)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
