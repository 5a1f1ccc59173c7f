#!/usr/bin/env bash
# The test command of the README and of CI: set up the environment, lint, run the default test suite.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
VENV="${MTP_VENV:-$PWD/.venv}"
export MTP_DATA_DIR="${MTP_DATA_DIR:-$PWD/../shared/data}"
"$VENV/bin/ruff" check . || exit 1
"$VENV/bin/python" -m pytest -q "$@"
rc=$?
if [[ $rc -eq 5 ]]; then
  echo "test.sh: pytest collected no tests; that is a failure, not a pass" >&2
  exit 1
fi
exit $rc
