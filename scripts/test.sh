#!/usr/bin/env bash
# Install the project with its test extras and run the whole test suite (CPU only; GPU tests skip).
set -euo pipefail
cd "$(dirname "$0")/.."
# The suite needs about 15 GB free at its peak: this .venv (7.1 GB) and either the README test's fresh clone .venv
# (removed when it ends) or the shared vLLM venv (7.5 GB); a log that shows the free space up front explains a failure.
echo "setup: free disk: $(df -h --output=avail "${TMPDIR:-/tmp}" | tail -1 | tr -d ' ') under ${TMPDIR:-/tmp}," \
  "$(df -h --output=avail "$HOME" | tail -1 | tr -d ' ') under $HOME" >&2
bash scripts/setup.sh test,models
# The HTML report test renders the page in headless Chromium (Debian's package; no browser download).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "setup: installing Debian chromium for the report test" >&2
  apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null)
fi
# The OCR fallback of the document branch uses Debian's tesseract (English data included).
if ! command -v tesseract >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "setup: installing Debian tesseract-ocr for the OCR tests" >&2
  apt-get install -y -q tesseract-ocr >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q tesseract-ocr >/dev/null)
fi
export RAY_AUTH_MODE=disabled
# The vLLM CPU environment (7.5 GB, ~5 min to build) is shared by clones on one machine: the slow vLLM tests
# build it once there and each run points its editable install at the calling checkout.
export PS3_VLLM_VENV="${PS3_VLLM_VENV:-$HOME/.cache/ps3-engine/venv-vllm}"
.venv/bin/ruff check --quiet .
exec .venv/bin/python -m pytest -q -ra "$@"
