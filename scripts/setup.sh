#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv and install the project into it.
# Usage: bash scripts/setup.sh [EXTRAS]   e.g. bash scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python_bin="${PYTHON:-python3}"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
quiet_pip() {
  # pip's local-mirror and setuptools warnings are noise: show the log only when pip fails.
  if ! .venv/bin/python -m pip install --quiet "$@" >"$log" 2>&1; then
    cat "$log" >&2
    echo "setup: pip install $* failed" >&2
    exit 1
  fi
}
if [ ! -x .venv/bin/python ]; then
  "$python_bin" -m venv .venv
  quiet_pip --upgrade pip
fi
target="."
[ -n "$extras" ] && target=".[${extras}]"
echo "setup: installing ${target} into .venv" >&2
quiet_pip -e "$target"
if [[ "$extras" == *models* ]] && ! .venv/bin/python -c "import sam2" 2>/dev/null; then
  echo "setup: installing sam2 (pure Python build, no CUDA extension)" >&2
  SAM2_BUILD_CUDA=0 quiet_pip --no-build-isolation --no-deps "sam2>=1.1"
fi
