#!/usr/bin/env bash
# The opt-in llama.cpp tests: exported GGUF files loaded by llama.cpp itself. llama-cpp-python is built
# from source here (its bundled llama.cpp, compiled for this CPU; no prebuilt binary is downloaded): about
# 18 minutes on 2 cores the first time. Then the tests marked llamacpp run (the gemma-3-270m one trains
# an adapter first: a few minutes). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
if ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  # The library only: llama.cpp's command-line tools, examples and tests are not needed here.
  CMAKE_ARGS="${CMAKE_ARGS:--DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF}" \
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-binary llama-cpp-python -e ".[llamacpp]"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -m pytest --run-llamacpp -m llamacpp "$@"
