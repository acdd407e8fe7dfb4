#!/usr/bin/env bash
# The README's first command: set up, then train the tiny demo end to end on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m trainer_core demo "$@"
