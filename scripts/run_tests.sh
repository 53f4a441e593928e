#!/usr/bin/env bash
# The CPU test suite, set-up included: `bash scripts/run_tests.sh [pytest args]`.
# GPU tests skip here with a reason; see the README for the one-line GPU commands.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest -q -ra "$@"
