#!/usr/bin/env bash
# Creates .venv with torch and the pack's requirements; a no-op when they are already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first and pinned: on this project's machines 2.13.0 is a CPU wheel on disk, an unpinned torch is a
# multi-GB CUDA download. Users inside ComfyUI keep their own torch; requirements.txt does not name it.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
.venv/bin/pip install -q -r requirements-dev.txt
