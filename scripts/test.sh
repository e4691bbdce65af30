#!/usr/bin/env bash
# Install the environment (scripts/setup.sh) and run the test suite. Extra arguments go to pytest.
#   bash scripts/test.sh --fast   only the tests that need neither torch nor a subprocess/HTTP server
#                                 (tiers set by tests/conftest.py from what each test uses)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest -q "$@"
