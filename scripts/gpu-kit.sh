#!/usr/bin/env bash
# Pack what a lent GPU machine lacks for scripts/gpu-check.sh into .whl/ (ignored by git): kaika's own
# wheel and the libraries at the versions of this .venv (what CI tests), built for that machine's
# Python 3.12 on x86-64. bitsandbytes' wheel carries libraries for every CUDA and ROCm release (43 MB):
# only the CUDA 13.0 one and the CPU one are kept, so the kit stays well under the 64 MiB that travels.
# On the machine:  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
#                    && PYTHONPATH=/tmp/site PYTHON=python3 scripts/gpu-check.sh --json "$OUT/gpu-check.json"
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
fetch() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$@"
}
for pkg in transformers peft trl datasets dill multiprocess gguf bitsandbytes; do
  fetch "$pkg==$(version "$pkg")"
done
.venv/bin/python -m pip wheel -q --no-deps -w .whl .
bnb=$(ls .whl/bitsandbytes-*.whl)
tmp=$(mktemp -d) && (cd "$tmp" && unzip -q "$OLDPWD/$bnb" \
  && find . -name 'libbitsandbytes_*.so' ! -name '*cuda130*' ! -name '*cpu*' -delete \
  && rm "$OLDPWD/$bnb" && zip -q -r "$OLDPWD/$bnb" .) && rm -rf "$tmp"
du -sh .whl && ls .whl
