#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment with every dependency at its locked version.
# The environment lives in $MTP_VENV (default: .venv in the checkout); it is rebuilt only when
# requirements.lock, pyproject.toml or the alias distributions change.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MTP_VENV:-$PWD/.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
stamp="$(cat requirements.lock pyproject.toml third_party/aliases/*/pyproject.toml | sha256sum | cut -c1-16)"
if [[ -f "$VENV/.mtp-stamp" && "$(cat "$VENV/.mtp-stamp")" == "$stamp" ]]; then
  exit 0
fi
echo "setup: creating $VENV (first run: a few minutes; TensorFlow, jax and torch are large)" >&2
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# torch==2.13.0 (in the lock) is the CPU build on our machines; see README for GPU machines.
# seqio-nightly / tfds-nightly: empty aliases for the pinned seqio / tensorflow-datasets (see their pyproject.toml).
# They go in the same resolve as the lock: otherwise pip satisfies t5's requirement with the real nightlies, which
# overwrite the seqio and tensorflow_datasets modules (and removing them later deletes those modules).
"$VENV/bin/pip" install -q -r requirements.lock ./third_party/aliases/seqio-nightly ./third_party/aliases/tfds-nightly
"$VENV/bin/pip" install -q --no-deps -e .
"$VENV/bin/pip" check
echo "$stamp" > "$VENV/.mtp-stamp"
