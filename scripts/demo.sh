#!/usr/bin/env bash
# Install the project (with the models extra: the demo builds a tiny torch captioner) and run the main job
# on the embedded default: generated high-res images served on loopback, crawled with a local Ray into
# ./demo-output/run. Usage: bash scripts/demo.sh [ps3-engine demo options]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh models
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
exec .venv/bin/ps3-engine demo --out demo-output "$@"
