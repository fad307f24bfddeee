#!/usr/bin/env bash
# Install the project with its test extras and run the whole test suite (CPU only; GPU tests skip).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,models
export RAY_AUTH_MODE=disabled
.venv/bin/ruff check --quiet .
exec .venv/bin/python -m pytest -q -ra "$@"
