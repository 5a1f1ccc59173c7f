"""Run every benchmark and rewrite the table of `benchmarks/README.md` with their figures.

Each benchmark runs as its own process with the arguments below and prints `name=value` lines last; the table gives
each figure beside its peer, its target, the date, commit and CPU of its run and the command, and the full output
follows it. Every benchmark's latest run on each kind of CPU (its bf16 hardware: AMX, AVX512-BF16 or neither, which
decides the precision `auto` trains in) is kept in `benchmarks/latest.json`, so `--only` reruns some, the table keeps
the others, and a run on one kind of CPU does not hide the figures of another. A target stated for one kind of CPU
(bf16 training's, for AMX) gets no verdict on another. Only the part between the README's `run_all` markers is
rewritten.

    python benchmarks/run_all.py [--full] [--only model_throughput,decode_throughput]

Needs MTP_DATA_DIR and MTP_VOCAB (the pipeline and corpus benchmarks read the shipped data). `--quick` settings by
default (about 35 minutes on 2 cores, 20 of them the two experiments of `parallel_stages`); `--full` drops them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import harness  # benchmarks/harness.py: Python puts the script's directory first on the path

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
LATEST = HERE / "latest.json"  # each benchmark's latest run per kind of CPU: output, figures, date, commit, machine
BEGIN, END = "<!-- run_all: begin -->", "<!-- run_all: end -->"


@dataclass(frozen=True)
class Figure:
    name: str  # as the script prints it: name=value
    what: str
    peer: str
    target: str  # a Python comparison against the value, as "> 2.5"; "" where the figure has no target
    cpu: str = ""  # the bf16 hardware (`harness.cpu_features()`) the target is stated for; "" for every CPU


BENCHMARKS: dict[str, tuple[list[str], list[Figure]]] = {
    "model_throughput": (["--quick"], [
        Figure("ratio_fp32", "training tokens/s, fp32, T5 1.1 small, batch 8, 512/114, AdamW; ours keeping its freed "
               "memory as `mtp train` does", "HF T5ForConditionalGeneration", ">= 1.5"),
        Figure("ratio_fp32_same_allocator", "the same, the peer's process keeping its freed memory too",
               "HF as above, freed memory kept", ""),
        Figure("ratio_bf16", "training tokens/s, bf16 autocast (only where bf16 is native)",
               "HF T5ForConditionalGeneration", ">= 2.5", cpu="AMX"),
        Figure("ratio_bf16_same_allocator", "the same, the peer's process keeping its freed memory too",
               "HF as above, freed memory kept", ""),
        Figure("mfu", "our model FLOP/s over this CPU's matrix-product peak, in the precision `auto` picks",
               "the peak measured in the same run", ">= 0.40", cpu="AMX"),
    ]),
    "decode_throughput": (["--quick"], [
        Figure("ratio_greedy", "greedy decoding tokens/s, batch 8, inputs 512, 64 new tokens, as many positions "
               "decoded, in the precision `auto` picks (bf16 where native)", "HF generate", ">= 2"),
        Figure("ratio_greedy_same_allocator", "the same, the peer's process keeping its freed memory too",
               "HF generate, freed memory kept", ""),
        Figure("ratio_greedy_compiled", "the same, ours with compiled steps on a CPU (`compile_steps=True`, "
               "`evaluate_checkpoint.compile_decoding`), its compile not timed (printed)", "HF generate", ">= 2"),
    ]),
    "quantize": (["--quick"], [
        Figure("size_ratio", "weights on disk, int8 linear layers (dynamic quantization) over fp32, T5 1.1 small",
               "the fp32 model", "< 0.5"),
        Figure("ratio_int8", "greedy decoding tokens/s, int8 over fp32, batch 8, inputs 512, 64 new tokens",
               "the fp32 model", ""),
    ]),
    "packed_throughput": (["--quick"], [
        Figure("ratio_useful", "useful (non-padding) tokens/s training on span_corruption_and_glue, 512/114, batch 8 "
               "rows, T5 1.1 small, in the precision `auto` picks: ours packed",
               "HF on the same examples, padded to each batch's longest", ">= 3"),
        Figure("ratio_useful_same_allocator", "the same, the peer's process keeping its freed memory as ours does "
               "(`mtplatform.allocator`): what packing and the model give without that setting",
               "HF as above, freed memory kept", ""),
    ]),
    "compile_payoff": ([], [
        Figure("compile_speedup", "training step of the experiments' mini model (batch 16 x 128/32, precision "
               "`auto`), eager over `torch.compile`d", "our eager step", ""),
        Figure("break_even_steps_cold", "steps after which a compiled run has earned back its first step, compile "
               "cache empty", "our eager steps", ""),
        Figure("break_even_steps_warm", "the same with the compile cache an earlier stage of the same shapes left",
               "our eager steps", ""),
    ]),
    "eval_throughput": (["--quick"], [
        Figure("ratio_eval", "evaluating SST-2's whole validation set (872): seqio pipeline, decoding, metrics; "
               "mini model, random weights, 8 positions; ours batched by input length since c26c71d",
               "the same seqio Evaluator decoding with HF generate, in seqio's order", ""),
        Figure("length_batching_speedup", "the same evaluation, ours batched by input length (each batch trimmed "
               "to its longest row) over ours in seqio's order and padding", "ours in seqio's order", ""),
        Figure("target_nll_over_decoding", "seconds of the teacher-forced scoring (target NLL, label figures, on "
               "decoding's encoder pass) over seconds of decoding, in that evaluation", "our decoding in the same run",
               "< 0.5"),
    ]),
    "parallel_stages": ([], [
        Figure("parallel_speedup", "wall time of mixing_strategies.gin (12 arms, BUDGET 2**-13, mini, 1 seed), one "
               "stage at a time over two side by side (`experiment.parallel = 2`), two rounds alternating",
               "the sequential run", ">= 1.3"),
        Figure("weights_identical", "1 where every checkpoint of every run is the same bytes", "the sequential run",
               "== 1"),
        Figure("figures_largest_relative_difference", "the largest relative difference of any figure, interval or "
               "p-value between the runs (each stage process on the sequential run's threads)", "the sequential run",
               "== 0"),
    ]),
    "input_pipeline": (["--quick", "--online"], [
        Figure("data_wait_fraction", "share of training time waiting for batches, span corruption + GLUE packed",
               "none (absolute)", "< 0.02"),
        Figure("data_wait_fraction_online", "the same with online mixing (ODM, shares moved every step)",
               "none (absolute)", "< 0.02"),
    ]),
    "startup": ([], [
        Figure("help_s", "seconds for `mtp --help` (fastest of 3 processes)", "none (absolute)", "< 3"),
        Figure("report_start_s", "seconds for `mtp report` to reach its own work (its error on a non-experiment)",
               "none (absolute)", "< 3"),
        Figure("report_whole_s", "seconds for `mtp report` to rebuild results/objectives (14 arms, 6 plots)",
               "none (absolute)", ""),
        Figure("export_whole_s", "seconds for `mtp export` of a mini checkpoint, start to end", "none (absolute)",
               "< 3"),
        Figure("import_torch_s", "seconds for `python -c 'import torch'`: the floor of any command that loads "
               "torch (export does not: numpy arrays)", "none (absolute)", ""),
        Figure("tasks_list_s", "seconds for `mtp tasks list`, which reads data (TensorFlow, seqio)", "none", ""),
        Figure("train_exit_s", "seconds from the last line of a 5-step `mtp train` (tiny, RTE) to its exit",
               "none (absolute)", ""),
        Figure("exit_saved_s", "seconds that ending without the interpreter's last garbage collection saves at "
               "that exit", "the same command with that collection", ""),
    ]),
    "resume_time": ([], [
        Figure("resume_ratio", "seconds to resume (restore, one step, save) after 400 steps over after 10",
               "the run resumed after 10 steps", "< 1.2"),
    ]),
    "corpus_memory": ([], [
        Figure("memory_ratio", "peak memory, corpus x20 over corpus x1 (streamed)", "the 1x corpus", "< 1.5"),
        Figure("first_batch_ratio", "seconds to the first batch, corpus x20 over x1", "the 1x corpus", ""),
    ]),
}


def run(script: str, args: list[str]) -> tuple[str, dict[str, str], float]:
    """(full output, name=value figures, seconds) of one benchmark."""
    began = time.perf_counter()
    child = subprocess.run([sys.executable, str(HERE / f"{script}.py"), *args], capture_output=True, text=True)
    seconds = time.perf_counter() - began
    output = child.stdout + (f"\n[exit {child.returncode}]\n{child.stderr[-2000:]}" if child.returncode else "")
    figures = dict(re.findall(r"^(\w+)=(\S+)$", child.stdout, flags=re.M))
    return output, figures, seconds


def verdict(value: str | None, figure: Figure, cpu: str) -> str:
    """Whether `value`, measured on a CPU of bf16 hardware `cpu`, meets `figure`'s target."""
    target = figure.target
    if value is None:
        return "not measured here"
    if not target:
        return ""
    if figure.cpu and cpu != figure.cpu:
        return f"no target here (the target is for {figure.cpu})"
    op, bound = target.split()
    ok = {">=": float(value) >= float(bound), "<": float(value) < float(bound),
          "==": float(value) == float(bound)}[op]
    return "met" if ok else "**not met**"


CPU_KINDS = ("AMX", "AVX512-BF16", "neither")  # the table's order: bf16 in hardware first


def runs_by_cpu(stored: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """latest.json's runs as {benchmark: {bf16 hardware: run}}; a file of one run per benchmark (before the runs were
    kept per kind of CPU) is read as that run's kind's."""
    return {script: ({runs["bf16"]: runs} if "output" in runs else runs) for script, runs in stored.items()}


def _ordered(runs: dict[str, dict]) -> list[dict]:
    return [runs[kind] for kind in sorted(runs, key=lambda k: CPU_KINDS.index(k) if k in CPU_KINDS else len(CPU_KINDS))]


def section(stored: dict[str, dict[str, dict]]) -> str:
    """The README's table and outputs from every benchmark's latest run on each kind of CPU (each with its own
    date, commit, machine)."""
    lines = [BEGIN, "", "Written by `python benchmarks/run_all.py`; each row is its benchmark's latest run on a kind "
             "of CPU (`--only` reruns some and keeps the others, and a run on one kind of CPU keeps the other kinds' "
             "runs, so the date, commit and machine are per row).", "",
             "| figure | value | target | verdict | what | peer | run | command |", "|---|---|---|---|---|---|---|---|"]
    for script, (_, wanted) in BENCHMARKS.items():
        for run_ in _ordered(stored.get(script, {})):
            command = "`" + " ".join(["python", f"benchmarks/{script}.py", *run_["args"]]) + "`"
            when = f"{run_['date']}, {run_['commit']}, {run_['machine']}"
            for figure in wanted:
                value = run_["figures"].get(figure.name)
                lines.append(f"| `{figure.name}` | {value or '-'} | {figure.target or '-'} | "
                             f"{verdict(value, figure, run_['bf16'])} | {figure.what} | {figure.peer} | {when} | "
                             f"{command} |")
    for script in BENCHMARKS:
        for run_ in _ordered(stored.get(script, {})):
            lines += ["", f"<details><summary>{script}: {run_['seconds']:.0f} s, {run_['date']}, commit "
                      f"{run_['commit']}, {run_['machine']}</summary>", "", "```", run_["output"].strip(), "```", "",
                      "</details>"]
    return "\n".join([*lines, "", END])


def _args(args: list[str], full: bool) -> list[str]:
    return [a for a in args if not (full and a == "--quick")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="each benchmark's full settings instead of --quick")
    p.add_argument("--only", help="comma-separated benchmark names (the others keep their stored figures)")
    args = p.parse_args()
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        sys.exit(f"--only: no benchmark named {', '.join(unknown)}; there are {', '.join(BENCHMARKS)}")
    stored = runs_by_cpu(json.loads(LATEST.read_text())) if LATEST.is_file() else {}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    for name in names:
        script_args = _args(BENCHMARKS[name][0], args.full)
        print(f"running {name} {' '.join(script_args)}", flush=True)
        output, figures, seconds = run(name, script_args)
        print(output, flush=True)
        stored.setdefault(name, {})[harness.cpu_features()] = {
            "output": output, "figures": figures, "seconds": seconds, "args": script_args,
            "date": str(datetime.date.today()), "commit": commit, "machine": harness.machine(),
            "bf16": harness.cpu_features()}
        LATEST.write_text(json.dumps(stored, indent=1) + "\n")  # as each finishes: a stopped run keeps the rest
    text = README.read_text()
    new = section(stored)
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + new + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n## Latest figures (`run_all.py`)\n\n" + new + "\n"
    README.write_text(text)
    print(f"wrote {README} and {LATEST}")


if __name__ == "__main__":
    main()
