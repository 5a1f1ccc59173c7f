"""An experiment's independent stages side by side (`experiment.parallel = N`): N stage processes, each running one
stage at a time, sharing the cores.

Why processes: a stage's training sets process-wide state (torch's and TensorFlow's thread pools, gin's scope, the
signal handlers), and on a CPU two stages side by side do more work per core than one stage on all of them. Why
long-lived ones: loading TensorFlow, seqio and the catalogue takes a stage process 15 to 20 s, paid once per
process, and while the first ones load the parent computes the experiment's baselines (`run`'s `meanwhile`).

Why each stage process has as many threads as a sequential run, not its share of the cores: the matrix products
split a long reduction (a weight's gradient over the batch's tokens, the output layer's over the vocabulary) over
the threads there are, so the thread count changes the last bits of a gradient. In bf16 one thread per stage
against two changed the mixing arms' figures by up to 11% after 96 steps (CoLA's target NLL 0.93 against 0.83, and
which arm was best); fp32 products differ too on an Intel CPU (on the AMD EPYC they happened not to). A rerun with
another `parallel` must not change an experiment's conclusions. So the N processes run on the sequential run's
threads, and their threads wait passively (`OMP_WAIT_POLICY=PASSIVE`): a thread at a barrier sleeps and gives its
core to the other process. Measured on 2 cores with a model of the mini's kind in bf16 (d_model 256, 4+4 layers,
batch 16 x 128/32), ms per step over all processes: one process on 2 threads 191-214; two on 1 thread each 161; two
on 2 threads, passive, 175; the same spinning (OpenMP's default) 1,880. The price is a process running alone (the
last stage, or while the other loads): its sleeping threads are woken at every parallel region, 300-322 ms, no
faster than one thread. The weights and figures are a sequential run's, bit for bit (`benchmarks/parallel_stages.py`
checks both, and measures the speed-up).

The parent keeps the order a sequential run has: a stage is handed out once the stages it starts from (its `init`,
its `reference`) have finished for its seed, and otherwise the first waiting stage goes next. A stage process
(`python -m mtplatform.parallel_stages`) parses the parent's gin files and overrides and imports its `--module`s
once, then runs the stages it is handed exactly as the sequential loop does (`experiment.experiment(only=...)`,
which checks that it built each stage as the parent did), each stage's output in `log.txt` in its stage directory.
Finished stages are skipped in the parent.

The parent passes SIGTERM and SIGINT on to the stage processes (each in its own session, so Ctrl-C reaches them
once); the running stages checkpoint and stop, and the parent stops with the signal's exit code: a rerun continues
every stage. A stage that fails lets the running ones finish, starts no others, and is an error naming it and the
end of its log.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

LOG = "log.txt"
_gin_sources: dict | None = None


def remember_gin(files: Sequence[str], overrides: Sequence[str], search_paths: Sequence[str]) -> None:
    """The gin files and overrides `mtp` parsed (`cli.parse_gin`): a stage process parses the same, in the same order.
    Not gin's config string: it does not keep a dict's order, and an arm list built from a dict (a sweep's `extra`)
    would name its stages differently."""
    global _gin_sources
    _gin_sources = {"files": list(files), "overrides": list(overrides), "search_paths": list(search_paths)}


def gin_sources() -> dict:
    if _gin_sources is None:
        raise ValueError("experiment.parallel > 1 runs stages in processes that parse the same gin files: start the "
                         "experiment with `mtp experiment` (or `cli.parse_gin`), not with gin bindings made in Python")
    return _gin_sources


@dataclass(eq=False)
class Job:
    """One stage for one seed, and the stages (by name) it must wait for."""

    stage: str
    seed: int
    after: tuple[str, ...]
    stage_dir: Path
    definition: dict  # the stage as the parent built it, which the stage process checks its own against
    began: float = 0.0


@dataclass(eq=False)
class _Worker:
    """A stage process and the job it runs (None: idle)."""

    process: subprocess.Popen
    job: Job | None = None


def run(jobs: Sequence[Job], parallel: int, finished: Callable[[Job], bool], modules: Sequence[str],
        verbose: bool = False, meanwhile: Callable[[], None] = lambda: None) -> None:
    """Run `jobs` (in a sequential run's order), at most `parallel` at a time; `finished(job)` says whether a job's
    stage already finished (it is then not run; it raises where the stage changed). `meanwhile()` runs in this
    process once the first stages are handed out, while their processes load. Returns when all finished."""
    import torch

    from mtplatform import interrupts

    setup = {"gin": gin_sources(), "modules": list(modules), "threads": torch.get_num_threads(), "verbose": verbose}
    pool = _Pool(list(jobs), parallel, finished, setup)
    with interrupts.StopRequests() as stops:
        try:
            pool.fill()
            meanwhile()
            while pool.fill():
                ended = _wait(pool.busy(), stops)
                if stops.signum:
                    pool.stop(stops.signum)
                    raise interrupts.Stopped(stops.signum, f"experiment stopped by {signal.Signals(stops.signum).name}"
                                             ": each running stage wrote a checkpoint; rerun to continue")
                for worker, code in ended:
                    pool.collect(worker, code)
        finally:
            pool.stop(signal.SIGTERM)  # ends idle processes; a stage still running only after an error checkpoints


@dataclass
class _Pool:
    """The jobs waiting and done (by (stage, seed)), and the stage processes, of `run`."""

    waiting: list[Job]
    parallel: int
    finished: Callable[[Job], bool]
    setup: dict
    workers: list[_Worker] = field(default_factory=list)
    done: set[tuple[str, int]] = field(default_factory=set)
    to_run: set[tuple[str, int]] = field(default_factory=set)  # checked by `finished` once: not finished

    def busy(self) -> list[_Worker]:
        return [w for w in self.workers if w.job is not None]

    def fill(self) -> bool:
        """Skip the ready jobs already finished, hand others to idle processes (started as needed, up to
        `parallel`); whether any job is running."""
        progressed = True
        while progressed:  # a skipped stage makes the stages that start from it ready
            progressed = False
            for job in [j for j in self.waiting if all((name, j.seed) in self.done for name in j.after)]:
                if (job.stage, job.seed) not in self.to_run and self.finished(job):
                    self.waiting.remove(job)
                    self.done.add((job.stage, job.seed))
                    progressed = True
                    continue
                self.to_run.add((job.stage, job.seed))
                if (worker := self._idle()) is not None:
                    self.waiting.remove(job)
                    _hand(worker, job, self.setup["threads"])
        if self.waiting and not self.busy():  # the arms are checked before, so this is a defect
            raise ValueError(f"stages {[j.stage for j in self.waiting]} wait for stages that never run")
        return bool(self.busy())

    def _idle(self) -> _Worker | None:
        idle = next((w for w in self.workers if w.job is None), None)
        if idle is None and len(self.workers) < self.parallel:
            idle = _Worker(_start_process(self.setup))
            self.workers.append(idle)
        return idle

    def collect(self, worker: _Worker, code: int | None) -> None:
        """A job ended with exit code `code` (None: its process died): done, or an error naming it once the other
        running stages have finished."""
        job, worker.job = worker.job, None
        if code != 0:
            running = self.busy()
            if running:
                print(f"experiment: stage {job.stage} (seed {job.seed}) failed; letting the {len(running)} running "
                      "stage(s) finish", file=sys.stderr)
            self.stop(None)
            how = f"exit code {code}" if code is not None else f"its process ended ({worker.process.wait()})"
            raise ValueError(f"stage {job.stage} (seed {job.seed}) failed with {how}: "
                             f"{_last_line(job.stage_dir / LOG)} (log: {job.stage_dir / LOG})")
        self.done.add((job.stage, job.seed))
        print(f"experiment: stage {job.stage} (seed {job.seed}) finished in {time.monotonic() - job.began:,.0f} s "
              f"[{len(self.done)} stages done, {len(self.waiting)} waiting]", file=sys.stderr)

    def stop(self, signum: int | None) -> None:
        """Pass `signum` on to the stage processes (None: let them finish their stages), and wait for them."""
        for worker in self.workers:
            if not worker.process.stdin.closed:
                worker.process.stdin.close()  # no more stages: a process ends after its current one
            if signum and worker.process.poll() is None:
                worker.process.send_signal(signum)
        for worker in self.workers:
            worker.process.wait()


def _start_process(setup: dict) -> subprocess.Popen:
    """A stage process: its stdin takes the set-up, then one job per line; its stdout answers one exit code per
    job; its stderr (set-up errors) is the parent's."""
    threads = str(setup["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OMP_WAIT_POLICY": "PASSIVE"}
    process = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               env=env, start_new_session=True, text=True)
    process.stdin.write(json.dumps(setup) + "\n")
    process.stdin.flush()
    return process


def _hand(worker: _Worker, job: Job, threads: int) -> None:
    job.stage_dir.mkdir(parents=True, exist_ok=True)
    job.began = time.monotonic()
    worker.job = job
    worker.process.stdin.write(json.dumps({"stage": job.stage, "seed": job.seed, "definition": job.definition,
                                           "log": str(job.stage_dir / LOG)}) + "\n")
    worker.process.stdin.flush()
    print(f"experiment: stage {job.stage} (seed {job.seed}) started in process {worker.process.pid}, {threads} "
          f"thread(s); log {job.stage_dir / LOG}", file=sys.stderr)


def _wait(busy: list[_Worker], stops) -> list[tuple[_Worker, int | None]]:
    """(worker, exit code) of the jobs that ended, once one has (or a signal came); None where a process died."""
    by_fd = {w.process.stdout.fileno(): w for w in busy}
    while not stops.signum:
        readable, _, _ = select.select(list(by_fd), [], [], 0.5)
        if readable:
            ended = []
            for fd in readable:
                line = by_fd[fd].process.stdout.readline()
                ended.append((by_fd[fd], int(line) if line.strip() else None))
            return ended
    return []


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()] if path.is_file() else []
    return lines[-1].strip() if lines else "(no output)"


def _set_up(setup: dict) -> int:
    """A stage process's one-time work: the parent's threads, modules and gin configuration."""
    import torch

    from mtplatform import allocator, catalog, cli
    from mtplatform.tf_setup import configure_tensorflow

    allocator.keep_freed_memory()  # as `mtp` does for every command that computes
    configure_tensorflow()  # the input pipeline's threads, as in a sequential run
    torch.set_num_threads(setup["threads"])
    catalog.import_modules(setup["modules"])
    cli.parse_gin(setup["gin"]["files"], setup["gin"]["overrides"], setup["gin"]["search_paths"])
    return 0


def _run_job(job: dict) -> int:
    from mtplatform import experiment

    experiment.experiment(only=job)
    return 0


def main() -> int:
    """A stage process: set up, then run each job read from stdin with its output in the job's log, and answer its
    exit code on the original stdout; stop at the first job that does not succeed."""
    from mtplatform import cli

    cli.skip_the_last_collection()
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the stages' own prints go to the logs, never into the answers
    setup = json.loads(sys.stdin.readline())
    code = cli.guarded(lambda: _set_up(setup), verbose=setup["verbose"])
    if code != 0:
        return code
    console = os.dup(2)
    from mtplatform import evaluate

    with evaluate.reusing_evaluators():  # the process's stages evaluate the same tasks' examples
        return _serve(answers, console, setup["verbose"])


def _serve(answers: TextIO, console: int, verbose: bool) -> int:
    """Run each job read from stdin, its output in its log; answer its exit code; stop at the first that fails."""
    from mtplatform import cli

    for line in sys.stdin:
        job = json.loads(line)
        with open(job["log"], "ab") as log:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
            code = cli.guarded(lambda job=job: _run_job(job), verbose=verbose)
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(console, 1), os.dup2(console, 2)
        answers.write(f"{code}\n")
        if code != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
