#!/usr/bin/env bash
# Set up (with the test tools) and run the whole test suite, slow end-to-end tests included.
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow" for the quick part only.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
