#!/usr/bin/env bash
# The README's second command, and what CI runs: set up, then the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
