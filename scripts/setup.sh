#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv and install the project into it.
# Usage: bash scripts/setup.sh [EXTRAS]   e.g. bash scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python_bin="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python_bin" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
fi
target="."
[ -n "$extras" ] && target=".[${extras}]"
# pip's local-mirror warnings are noise; real errors still fail the script through pipefail.
.venv/bin/python -m pip install --quiet -e "$target" 2>&1 | { grep -v -e "^WARNING: Location" -e "BuildBackendWarning" || true; }
