#!/usr/bin/env bash
# The README's test command: installs what the tests need, then runs the whole suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_system.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Two workers (pytest-xdist, a test file per unit: tests/conftest.py): most slow tests are chains of single-threaded
# stage processes whose start-up leaves the second core idle. `-n 0` runs them one at a time.
exec .venv/bin/python -m pytest -q -ra --durations=25 -n 2 "$@"
