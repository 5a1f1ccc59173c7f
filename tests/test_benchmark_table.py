"""benchmarks/run_all.py's table: each benchmark's latest run per kind of CPU, targets judged only where they apply."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def run_all():
    sys.path.insert(0, str(BENCHMARKS))  # run_all imports its sibling `harness`, as a script does
    try:
        yield importlib.import_module("run_all")
    finally:
        sys.path.remove(str(BENCHMARKS))


def _rows(table: str, figure: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines()
            if line.startswith(f"| `{figure}` |")]


def test_a_run_on_another_cpu_keeps_the_stored_ones_and_gets_no_verdict_on_an_amx_target(run_all):
    stored = run_all.runs_by_cpu(json.loads(run_all.LATEST.read_text()))  # the committed file, read as run_all does
    amx = stored["model_throughput"]["AMX"]
    assert {"ratio_bf16", "mfu"} <= amx["figures"].keys()
    stored["model_throughput"]["AVX512-BF16"] = {
        **amx, "figures": {"ratio_bf16": "3.5", "mfu": "0.7", "ratio_fp32": "1.6"}, "bf16": "AVX512-BF16",
        "machine": "AMD EPYC, 2 cores, bf16 hardware: AVX512-BF16", "output": "the AVX512-BF16 run's output"}

    table = run_all.section(stored)

    mfu = _rows(table, "mfu")
    avx2 = [run["figures"]["mfu"] for kind, run in stored["model_throughput"].items() if kind == "neither"]
    assert [row[1] for row in mfu] == [amx["figures"]["mfu"], "0.7", *avx2]  # AMX first, the stored runs kept
    assert mfu[0][3] == ("met" if float(amx["figures"]["mfu"]) >= 0.40 else "**not met**")
    assert all(row[3] == "no target here (the target is for AMX)" for row in mfu[1:])
    assert _rows(table, "ratio_bf16")[1][3] == "no target here (the target is for AMX)"
    assert _rows(table, "ratio_fp32")[1][3] == "met"  # a target for every CPU is judged on every CPU
    assert "AMD EPYC, 2 cores, bf16 hardware: AVX512-BF16" in mfu[1][6]
    assert table.count("<summary>model_throughput:") == 2 + len(avx2) and "the AVX512-BF16 run's output" in table
    # A run of the same kind replaces that kind's run only.
    stored["model_throughput"]["AVX512-BF16"]["figures"]["mfu"] = "0.3"
    assert [row[1] for row in _rows(run_all.section(stored), "mfu")] == [amx["figures"]["mfu"], "0.3", *avx2]


def test_a_file_of_one_run_per_benchmark_is_read_as_its_cpus(run_all):
    run = {"output": "out", "figures": {"help_s": "0.2"}, "seconds": 1.0, "args": [], "date": "2026-12-05",
           "commit": "abc1234", "machine": "some CPU", "bf16": "neither"}
    assert run_all.runs_by_cpu({"startup": run}) == {"startup": {"neither": run}}
    assert run_all.runs_by_cpu({"startup": {"neither": run}}) == {"startup": {"neither": run}}
