"""What every side-by-side benchmark shares: the machine it ran on, and each side in its own process, alternating.

On a GPU (`--device cuda`), timers wait for the GPU's queued work and peak memory is the GPU's allocations.

A side (ours, or the peer) is measured by running the benchmark script again with `--side NAME`: the child prints
one JSON line (seconds per timed step, peak resident memory, anything else the side reports). Sides alternate over
rounds (A B, B A, A B, ...), so a slow minute of a noisy machine hits both, and neither inherits the other's
allocator state, threads or caches (in one process the fp32 peer once ran 2.4x slower than alone). Figures are the
minimum and the median over all timed steps of all rounds.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def cpu_features() -> str:
    """'AMX', 'AVX512-BF16' or 'neither': whether bf16 matrix products run in hardware on this CPU."""
    from mtplatform import precision

    return precision.cpu_bf16_hardware()


def machine() -> str:
    """One line: CPU model, cores, bf16 hardware, threads, torch version, GPU where there is one."""
    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{model}, {os.cpu_count()} cores, bf16 hardware: {cpu_features()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}{gpu}")


def device(name: str) -> torch.device:
    """'auto' -> the GPU where there is one, else the CPU; 'cpu' and 'cuda' pass through."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# The sides of a benchmark against transformers: ours, the peer as a transformers script runs, and the peer keeping
# its freed memory as every `mtp` command that computes does (`mtplatform.allocator`), which says how much of a
# ratio that setting is.
SIDES = {"ours": "ours", "hf": "HF", "hf_kept": "HF, freed memory kept"}


def set_allocator(side: str) -> None:
    """Keep freed memory in this side's process, as `mtp` does, except on the plain peer's side ("hf")."""
    from mtplatform import allocator

    if side != "hf":
        allocator.keep_freed_memory()


def hf_t5(cfg, like: torch.nn.Module | None = None) -> torch.nn.Module:
    """The peer: a transformers `T5ForConditionalGeneration` of our `T5Config`'s shape, initialised by transformers,
    or holding the weights of `like` (our T5). Training benchmarks start both sides from the same weights: at
    transformers' initialisation (output layer std 1.0, a first loss of about 33) the softmax's gradient falls into
    fp32's denormal range, which Intel CPUs compute many times slower (the peer's fp32 step took 13.6-16.9 s against
    4.0-5.6 s with denormals flushed), so the comparison would be of the two initialisations, not the two models."""
    from transformers import T5Config as HFConfig
    from transformers import T5ForConditionalGeneration

    from mtplatform.huggingface import config_to_hf, to_hf_state_dict

    model = T5ForConditionalGeneration(HFConfig(**{k: v for k, v in config_to_hf(cfg).items()
                                                   if k != "architectures"}))
    if like is not None:
        missing, unexpected = model.load_state_dict(to_hf_state_dict(like), strict=False)
        if unexpected or any("embed_tokens" not in name for name in missing):  # the stacks' views of `shared`
            raise ValueError(f"hf_t5: weights not mapped: missing {missing}, unexpected {unexpected}")
    return model


def peak_mib(on: torch.device | None = None) -> float:
    """Peak memory so far, MiB: the GPU's allocations on a GPU, else this process's resident memory."""
    if on is not None and on.type == "cuda":
        return torch.cuda.max_memory_allocated(on) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(on: torch.device | None) -> None:
    """Wait for the GPU's queued work: its kernels run asynchronously, so a timer must wait for them."""
    if on is not None and on.type == "cuda":
        torch.cuda.synchronize(on)


def time_steps(step: Callable[[], object], warmup: int, steps: int, on: torch.device | None = None) -> list[float]:
    """Seconds of each of `steps` calls of `step` after `warmup` untimed ones (on a GPU, until its work is done)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        synchronize(on)
        began = time.perf_counter()
        step()
        synchronize(on)
        times.append(time.perf_counter() - began)
    return times


def report_side(seconds: list[float], on: torch.device | None = None, **extra) -> None:
    """The child's answer: its step times, peak memory and extra figures, as the last line of stdout."""
    print(json.dumps({"seconds": seconds, "peak_mib": peak_mib(on), **extra}), flush=True)


def run_sides(script: str | Path, sides: Sequence[str], rounds: int, args: Sequence[str],
              unit: str = "per step") -> dict[str, dict]:
    """Run `script --side S *args` for every side, alternating the order each round; per side: every timed step's
    seconds (`seconds`, `unit` in the progress lines), the highest peak memory (`peak_mib`) and the last round's
    other figures."""
    results: dict[str, dict] = {side: {"seconds": [], "peak_mib": 0.0} for side in sides}
    for r in range(rounds):
        for side in sides if r % 2 == 0 else list(reversed(sides)):
            child = subprocess.run([sys.executable, str(script), "--side", side, *args], capture_output=True,
                                   text=True)
            if child.returncode != 0:
                raise SystemExit(f"{Path(script).name} --side {side} failed:\n{child.stderr[-3000:]}")
            answer = json.loads(child.stdout.strip().splitlines()[-1])
            results[side]["seconds"] += answer.pop("seconds")
            results[side]["peak_mib"] = max(results[side]["peak_mib"], answer.pop("peak_mib"))
            results[side].update(answer)
            print(f"  round {r + 1}/{rounds} {side}: {results[side]['seconds'][-1]:.3g} s {unit}", flush=True)
    return results


def share_equal(a: list[list[int]], b: list[list[int]]) -> float:
    """The share of positions at which two sides decoded the same token (compared up to the shorter of two rows:
    a row ends at its last EOS)."""
    pairs = [(x, y) for row_a, row_b in zip(a, b, strict=True) for x, y in zip(row_a, row_b, strict=False)]
    return sum(x == y for x, y in pairs) / len(pairs)


def rates(work: float, seconds: list[float]) -> tuple[float, float]:
    """(best, median) of `work` per second over step times."""
    return work / min(seconds), work / statistics.median(seconds)


def matmul_peak(dtype: torch.dtype, on: torch.device | None = None, sizes: Sequence[int] | None = None,
                repeats: int = 5) -> float:
    """The best FLOP/s of square matrix products at `sizes` in `dtype` on this CPU or GPU: the roof that MFU
    divides by (sizes 512-2048 on a CPU, 4096-8192 on a GPU, where small products cannot fill the chip)."""
    on = on or torch.device("cpu")
    sizes = sizes or ((4096, 8192) if on.type == "cuda" else (512, 1024, 2048))
    repeats = repeats * 4 if on.type == "cuda" else repeats
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, device=on).to(dtype), torch.randn(n, n, device=on).to(dtype)
        a @ b  # warm-up
        synchronize(on)
        began = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(on)
        best = max(best, 2 * n ** 3 * repeats / (time.perf_counter() - began))
    return best
