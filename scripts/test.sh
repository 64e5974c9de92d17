#!/usr/bin/env bash
# Set up (the test tools, Debian's chromium for the web page test, Go for the Ollama template test), then run the whole test suite,
# slow end-to-end tests included. Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow".
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
# The web page test drives Debian's headless Chromium through Playwright (no browser download); a
# Japanese font makes its screenshot legible. Ollama's templates are rendered by Go's text/template
# (Debian's golang-go), the engine Ollama itself uses. Installed here where apt-get can, said where it cannot.
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium fonts-ipafont-gothic)
command -v go >/dev/null || missing+=(golang-go)
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  elif command -v apt-get >/dev/null && command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "scripts/test.sh: ${missing[*]} missing and cannot be installed here (needs apt-get as root);" \
      "install them, or the web page test (tests/inference/test_webui.py) and the Ollama template test" \
      "(tests/inference/test_export.py) fail" >&2
  fi
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
