"""The allocator setting: a process that keeps its freed memory stops faulting pages in at every step."""

from __future__ import annotations

import subprocess
import sys

STEPS = """
import resource, sys, torch
from mtplatform import allocator
if sys.argv[1] == "keep":
    assert allocator.keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
per_step = []
for _ in range(6):  # a step's tensors, of several sizes (MiB: 64, 16, 48, 64, 8), allocated, written and freed
    before = faults()
    tensors = [torch.ones(mib * 2**18) for mib in (64, 16, 48, 64, 8)]
    del tensors
    per_step.append(faults() - before)
# The quietest of the last three steps: with AVX2 kernels forced on an AVX512 CPU, a kept process now and then
# faults one tensor's pages in again (16,384 for 64 MiB) in a late step; never in every one of them.
print(min(per_step[3:]))
"""


def _faults_of_late_steps(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1])


def test_kept_memory_is_reused_without_page_faults():
    default, kept = _faults_of_late_steps("default"), _faults_of_late_steps("keep")
    # 200 MiB written per step: about 51,000 pages of 4 KiB (100 of 2 MiB where the kernel gives huge pages). By
    # default glibc maps and unmaps blocks this large at every step, so the step faults most of them in again; with
    # the memory kept, the steps after the first few write into pages the process already has.
    assert default >= 50, default
    assert kept * 100 <= default, (kept, default)


def test_commands_that_compute_keep_freed_memory(monkeypatch, tmp_path):
    from mtplatform import allocator, cli

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(True) or True)
    assert cli.main(["report", str(tmp_path)]) == 2  # not an experiment; report reads files only
    assert calls == []
    assert cli.main(["tasks", "show", "--mixture_or_task=no_such_task"]) == 2  # reads data: set up as for training
    assert calls == [True]
