#!/usr/bin/env bash
# Sets up .venv with PyTorch and builds cram_ext into it (editable). Safe to rerun: when the
# built extension is newer than every kernel source it only checks the install.
#
# The CUDA kernels are compiled when nvcc is found (CUDA_HOME, default /usr/local/cuda) and the
# installed torch has CUDA; CRAM_EXT_FORCE_CPU=1 builds the CPU kernels only.
# CRAM_EXT_PIP_FLAGS (default --quiet) is passed to the pip that builds, e.g. -v for the
# compiler output.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}

extension_up_to_date() {
  local so
  so=$(ls cram_ext/_C*.so 2>/dev/null | head -n 1)
  [ -n "$so" ] && [ -x .venv/bin/python ] || return 1
  [ -z "$(find csrc setup.py -newer "$so" -type f 2>/dev/null | head -n 1)" ] || return 1
  .venv/bin/python -c "import cram_ext" 2>/dev/null
}

if extension_up_to_date; then
  echo "cram_ext is built and up to date in .venv"
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip setuptools wheel
.venv/bin/python -m pip install --quiet "$TORCH_SPEC" numpy ninja
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# shellcheck disable=SC2086  # the flags are meant to split
.venv/bin/python -m pip install ${CRAM_EXT_PIP_FLAGS:---quiet} --no-build-isolation -e ".[test,plot,analysis]"
.venv/bin/python -c "import cram_ext, torch; print('cram_ext', cram_ext.__version__, 'with torch', torch.__version__)"
