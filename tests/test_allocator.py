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
for _ in range(5):  # a step's tensors, of several sizes (MiB: 64, 16, 48, 64, 8), allocated, written and freed
    before = faults()
    tensors = [torch.ones(mib * 2**18) for mib in (64, 16, 48, 64, 8)]
    del tensors
print(faults() - before)
"""


def _faults_of_last_step(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1])


def test_kept_memory_is_reused_without_page_faults():
    default, kept = _faults_of_last_step("default"), _faults_of_last_step("keep")
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
