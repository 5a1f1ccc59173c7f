#!/usr/bin/env bash
# The test command of the README and of CI: set up the environment, lint, run the default test suite, then (without
# arguments) the slow tests as their own step (21 SIGKILLs of a real run, torch.compile, two torchrun processes against
# one, the CLI from training to export, `mtp cache` over the whole corpus, a tiny mixture search with its validation,
# online mixing's experiment, SIGKILLs and a SIGTERM, two torchrun processes and DoReMi's resume, the smoke
# experiment and its stages run side by side, the compression experiment, a student learning its teacher's
# distribution and `mtp distill`, and the CLI's task commands; about 33 minutes on 2 idle cores).
# Each step lists its ten slowest tests, to keep the default one under 15 minutes. The default step runs on two
# pytest-xdist workers: much of a test's time is single-threaded (TensorFlow's graph building, autograph, seqio's
# pipelines, a process's imports), so two overlap on two cores; on the 2.0 GHz AVX2 EPYC 690 s against 904 s one
# after the other, the same 427 tests passed. The slow step stays one test at a time: its SIGKILLs, torchrun
# processes and side-by-side stages time and count processes of their own.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
VENV="${MTP_VENV:-$PWD/.venv}"
export MTP_DATA_DIR="${MTP_DATA_DIR:-$PWD/../shared/data}"
"$VENV/bin/ruff" check . || exit 1

run_pytest() {
  "$VENV/bin/python" -m pytest -q --durations=10 "$@"
  local rc=$?
  if [[ $rc -eq 5 ]]; then
    echo "test.sh: pytest collected no tests; that is a failure, not a pass" >&2
    return 1
  fi
  return $rc
}

if [[ $# -gt 0 ]]; then  # the tests asked for, as asked
  run_pytest "$@"
  exit $?
fi
run_pytest -n 2 || exit $?
run_pytest -m slow tests/test_faults.py tests/test_train.py tests/test_cache.py tests/test_mixture_search.py \
  tests/test_online_mixing.py tests/test_experiment.py tests/test_tasks.py tests/test_mixing.py \
  tests/test_distill.py tests/test_model.py
