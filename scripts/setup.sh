#!/usr/bin/env bash
# Install the project and the extras asked for. The one install path for developers, the demo, CI and the
# container images (docker/Dockerfile, docker/Dockerfile.gpu), so that they cannot drift apart.
#
# Usage:
#   bash scripts/setup.sh [EXTRAS]            create/update .venv, editable install (demo: models; tests: test,models)
#   bash scripts/setup.sh --system EXTRAS     install into the current python ($PYTHON or python3), not editable
#                                             (container images: docker build ... uses `--system models` or
#                                             `--system models,gpu`)
# Extras: models (torch, transformers, SAM2 without its CUDA extension), gpu (vLLM; SAM2 with its CUDA
# extension, needs nvcc), test, documents. pip reads its index from the usual pip configuration: nothing
# here names a local wheel folder, so an image build takes torch from the normal index.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=venv
if [ "${1:-}" = "--system" ]; then
  mode=system
  shift
fi
extras="${1:-}"
python_bin="${PYTHON:-python3}"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT

if [ "$mode" = venv ]; then
  if [ ! -x .venv/bin/python ]; then
    "$python_bin" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
  fi
  py=.venv/bin/python
  editable=(-e)
else
  py="$python_bin"
  editable=()
fi

quiet_pip() {
  # pip's mirror and setuptools warnings are noise: show the log only when pip fails.
  if ! "$py" -m pip install --quiet "$@" >"$log" 2>&1; then
    cat "$log" >&2
    echo "setup: pip install $* failed" >&2
    exit 1
  fi
}

has_extra() { [[ ",$extras," == *",$1,"* ]]; }

# The extras list without `models` when vLLM is asked for: vLLM pins its own CUDA torch, which must win
# over the models extra's CPU-usable pin; the models extra's other packages are installed after it.
pip_extras="$extras"
if has_extra gpu && has_extra models; then
  pip_extras="$(echo ",$extras," | sed 's/,models,/,/; s/^,//; s/,$//')"
fi
target="."
[ -n "$pip_extras" ] && target=".[${pip_extras}]"
echo "setup: installing ${target} into ${py}" >&2
quiet_pip "${editable[@]}" "$target"

if has_extra gpu && has_extra models; then
  # The models extra minus torch/torchvision, read from pyproject.toml so the list lives in one place.
  mapfile -t model_reqs < <("$py" - <<'PY'
import re
import tomllib

extra = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["models"]
for req in extra:
    if re.split(r"[<>=!~ \[;]", req, maxsplit=1)[0].lower() not in {"torch", "torchvision"}:
        print(req)
PY
  )
  echo "setup: installing the models extra beside vLLM's torch: ${model_reqs[*]}" >&2
  quiet_pip "${model_reqs[@]}"
fi

if has_extra models && ! "$py" -c "import sam2" 2>/dev/null; then
  # --no-build-isolation (SAM2's build imports torch) builds with this environment's own tools.
  quiet_pip "setuptools>=68" wheel
  if has_extra gpu; then
    # SAM2's CUDA extension (connected components for mask post-processing) needs nvcc and torch's CUDA
    # headers; a failed build must fail the image, not silently ship the pure-Python fallback.
    if ! command -v nvcc >/dev/null 2>&1; then
      echo "setup: the gpu extra builds SAM2's CUDA extension and needs nvcc (a CUDA devel image)" >&2
      exit 1
    fi
    torch_cuda="$("$py" -c "import torch; print((torch.version.cuda or 'none').split('.')[0])")"
    nvcc_cuda="$(nvcc --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')"
    if [ "$torch_cuda" != "$nvcc_cuda" ]; then
      echo "setup: torch is built for CUDA $torch_cuda but nvcc is CUDA $nvcc_cuda; use a base image of CUDA $torch_cuda" >&2
      exit 1
    fi
    echo "setup: installing sam2 with its CUDA extension" >&2
    SAM2_BUILD_CUDA=1 SAM2_BUILD_ALLOW_ERRORS=0 quiet_pip --no-build-isolation --no-deps "sam2>=1.1"
  else
    echo "setup: installing sam2 (pure Python build, no CUDA extension)" >&2
    SAM2_BUILD_CUDA=0 quiet_pip --no-build-isolation --no-deps "sam2>=1.1"
  fi
fi
