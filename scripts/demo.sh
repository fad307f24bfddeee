#!/usr/bin/env bash
# Install the project and run the main job on the embedded default: generated high-res images served
# on loopback, crawled with a local Ray into ./demo-output/run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
exec .venv/bin/ps3-engine demo --out demo-output "$@"
