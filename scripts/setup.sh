#!/usr/bin/env bash
# Sets up .venv with PyTorch and builds cram_ext into it (editable). Safe to rerun.
#
# The CUDA kernels are compiled when nvcc is found (CUDA_HOME, default /usr/local/cuda) and the
# installed torch has CUDA; CRAM_EXT_FORCE_CPU=1 builds the CPU kernels only.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
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
.venv/bin/python -m pip install --quiet --no-build-isolation -e ".[test,plot]"
.venv/bin/python -c "import cram_ext, torch; print('cram_ext', cram_ext.__version__, 'with torch', torch.__version__)"
