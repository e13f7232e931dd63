#!/usr/bin/env bash
# Install everything (scripts/setup.sh plus test-only system tools), then lint, type-check and run
# the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

# Test-only system tools: a headless Chromium (and its driver) for the browser tests.
if ! command -v chromium >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq chromium chromium-driver
fi

.venv/bin/ruff check .
.venv/bin/mypy  # the files listed in pyproject's [tool.mypy]
.venv/bin/pytest -q "$@"
