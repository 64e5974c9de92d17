#!/usr/bin/env bash
# Set up (the test tools, and Debian's chromium for the web page test), then run the whole test suite,
# slow end-to-end tests included. Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow".
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
# The web page test drives Debian's headless Chromium through Playwright (no browser download); a
# Japanese font makes its screenshot legible. Installed here where apt-get can, said where it cannot.
if [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-ipafont-gothic >/dev/null
  elif command -v apt-get >/dev/null && command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-ipafont-gothic >/dev/null
  else
    echo "scripts/test.sh: /usr/bin/chromium is missing and cannot be installed here (needs apt-get as root);" \
      "install Debian's chromium, or the web page test (tests/inference/test_webui.py) fails" >&2
  fi
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
