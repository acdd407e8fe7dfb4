#!/usr/bin/env bash
# Everything the gated tests in tests/comfyui need, around a ComfyUI checkout you already have:
#   bash scripts/comfyui_test_env.sh /path/to/ComfyUI
# builds /path/to/ComfyUI/.venv (ComfyUI's requirements and this pack's), this pack's own .venv (which runs the
# tests, selenium included: scripts/setup.sh), installs Chromium and its driver from the system's packages for the
# live-view browser test, and prints the command that runs the gated tests. A no-op for whatever is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
COMFYUI_DIR=$(cd "${1:?usage: bash scripts/comfyui_test_env.sh /path/to/ComfyUI}" && pwd)
if [ ! -f "$COMFYUI_DIR/main.py" ] || [ ! -d "$COMFYUI_DIR/comfy" ]; then
  echo "error: $COMFYUI_DIR is not a ComfyUI checkout (no main.py and comfy/ there)" >&2
  exit 2
fi
PY=${PYTHON:-python3}
VENV="$COMFYUI_DIR/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# ComfyUI runs on the CPU here with these two (torchaudio is optional to ComfyUI and has no build beside them);
# pinned through a constraints file so no requirement pulls another torch.
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
printf 'torch==%s\ntorchvision==%s\n' "${COMFY_TORCH_VERSION:-2.14.1}" "${COMFY_TORCHVISION_VERSION:-0.29.1}" \
  > "$CONSTRAINTS"
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  "$VENV/bin/pip" install -q -c "$CONSTRAINTS" torch torchvision
fi
grep -v -E '^(torch|torchvision|torchaudio)\b' "$COMFYUI_DIR/requirements.txt" \
  | "$VENV/bin/pip" install -q -c "$CONSTRAINTS" -r /dev/stdin
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" -r requirements.txt
bash scripts/setup.sh  # the pack's .venv, which drives the tests (and the browser, through selenium)
.venv/bin/pip install -q -r requirements-dev.txt  # a .venv made before selenium was a test requirement

# The browser test drives ComfyUI's own frontend in headless Chromium.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if command -v apt-get >/dev/null; then
    apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null \
      || echo "warning: chromium could not be installed; the browser test will skip and say so" >&2
  else
    echo "warning: no apt-get: install Chromium and chromedriver yourself, or the browser test skips" >&2
  fi
fi

echo "ready. Run the gated tests with:"
echo "  COMFYUI_DIR=$COMFYUI_DIR COMFYUI_PYTHON=$VENV/bin/python .venv/bin/python -m pytest tests/comfyui"
