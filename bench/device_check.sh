#!/usr/bin/env bash
# One pass of every check that needs a CUDA GPU, for a machine with one H100/H200 and no network:
#
#   OUT=/some/dir bash bench/device_check.sh            (from anywhere; runs at the repo root)
#   bash bench/device_check.sh --dry-run                (no GPU needed: proves every stage starts)
#
# Stages, in order of value, each under `timeout` and all under one deadline
# (DEVICE_CHECK_BUDGET_S, default 440 s, so a run ends inside 8 minutes even if a stage hangs).
# Expected wall time of a real run on an H200 host (16 cores), stage by stage. "dry" is the dry
# run measured on a 2-core CI-sized machine under load (64 s in all when it reuses the build;
# the first dry run there compiled the CUDA sources for sm_90 in 230 s, about 130 CPU-seconds
# of which bindings.cpp is the longest file); "real" adds what only the GPU run does:
#   stage      dry   real
#   preflight   8 s    5 s  Python headers, C++ compiler, nvcc, ninja, compute-sanitizer, torch CUDA
#   build     230 s   75 s  setup.py build_ext --inplace, sm_90, one file per core (no ninja: ~150 s)
#   import      6 s    5 s  the in-place package imports from the repo root, CUDA kernels registered
#   tests       8 s  100 s  test_cuda_kernels.py + the CUDA cases of the op suites and of streaming
#                           (cram_forward, cram_step, the model's step, training; collect: 548)
#   memcheck    6 s   40 s  compute-sanitizer memcheck over bench/sanitizer_driver.py (CPU path dry)
#   racecheck   6 s   50 s  compute-sanitizer racecheck over the same driver
#   decisive    5 s   30 s  head_dim 64/128, L 8192/16384, 1.6%/100% routed vs flash and cuDNN,
#                           eager and CUDA-graph replay (8 cases)
#   bench       6 s   50 s  scan bandwidth, attention forward + backward vs flash (head_dim 64/128,
#                           L 8192, 1.6%/100%), the rest of the attention grid with an unfused
#                           baseline
#   fused       4 s  ~30 s  one CRAM layer's eval forward, d 64/256, L 2048/8192, 2%/10% routed:
#                           the fused op (eager, CUDA graph) and the layer fused and composed
#   training    4 s  ~30 s  the cpu preset's CRAM run (seed 0, 400 steps) on the GPU, then its test
#                           metrics: consolidation on the CUDA kernels, ms per step
#   streaming   4 s  ~30 s  one decoding step: routed_attention_with_kvcache vs SDPA over the
#                           cache (head_dim 64/128, context 8K/32K, batch 1/8, 1.6%/100%), the
#                           state update, one CRAM layer's step (cram_step; the layer fused and
#                           composed; d 64/256, batch 1/8)
#   flex        4 s <=90 s  FlexAttention baseline, 2 compilations; gets whatever time is left
#   total            415 s  before flex (about 7 minutes); the deadline stops everything at 440 s
# A stage whose predecessor failed in a way that makes it meaningless (no build) is skipped.
# Every Python stage imports the freshly built package: PYTHONPATH is the repository root.
#
# --dry-run runs every stage far enough to prove it starts: the preflight without a GPU; the
# build reuses an in-place extension already built with the CUDA kernels and newer than every
# source (CI's), else compiles the CUDA sources into build/device_check_dry_run (the in-place
# extension is left alone); the import checks that build's CUDA kernels register; the tests and
# benchmarks are collected (pytest --collect-only); the sanitizer driver runs on the CPU.
#
# Results (8 files at most, the device tool's limit), all under $OUT:
#   summary.json  stage -> {status, seconds}, GPU name, torch version, date
#   build.log  tests.xml  tests.log  sanitizer.log  bench.log  gpu_bench.jsonl (one JSON per
#   measurement or test outcome, appended as measured)
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; fi
if [ $DRY_RUN -eq 1 ]; then
  OUT=${OUT:-$(mktemp -d)}
else
  OUT=${OUT:?set OUT to the output directory}
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
START=$(date +%s)
# The dry run's only long stage is a build on a small machine without CI's: no GPU time at stake.
BUDGET=${DEVICE_CHECK_BUDGET_S:-$([ $DRY_RUN -eq 1 ] && echo 1800 || echo 440)}
STAGES=$(mktemp)  # stage records; outside $OUT, which may return 8 files at most
DRY_BUILD=$ROOT/build/device_check_dry_run  # kept, so a second dry run compiles only what changed
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export CRAM_TEST_TIMEOUT_S=${CRAM_TEST_TIMEOUT_S:-60}  # per test (python_tests/conftest.py)
# -v: one line per test as it finishes, so a stage cut short still shows how far it got.
PYTEST=("$PY" -m pytest -v -rf -p no:cacheprovider)

write_summary() {
  "$PY" - "$STAGES" "$OUT/summary.json" "$DRY_RUN" "$GPU_NAME" "$TORCH_VERSION" <<'EOF'
import json, sys, time
stages = {}
for line in open(sys.argv[1]):
    name, status, seconds = line.rstrip("\n").split("\t")
    stages[name] = {"status": status, "seconds": int(seconds)}
json.dump({"dry_run": sys.argv[3] == "1", "stages": stages, "gpu": sys.argv[4], "torch": sys.argv[5],
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
          open(sys.argv[2], "w"), indent=1)
EOF
}

finish() {
  write_summary
  rm -f "$STAGES"
  cat "$OUT/summary.json"
  echo "device_check: $(( $(date +%s) - START )) s in all"
}

# Some GPU hosts (gVisor) run CUDA programs but not compute-sanitizer, which then reports
# "Device not supported": a stage that failed for that reason is marked unsupported, not failed,
# and the other sanitizer stage is skipped.
SANITIZER_REFUSED=0
sanitizer_refused_device() {  # sanitizer_refused_device NAME
  grep -q "Device not supported" "$OUT/sanitizer.log" || return 0
  SANITIZER_REFUSED=1
  sed -i "\$ s/^$1\tfailed (rc [0-9]*)\t/$1\tunsupported (compute-sanitizer: Device not supported)\t/" "$STAGES"
  write_summary
}

skip() {  # skip NAME REASON
  printf '%s\tskipped (%s)\t0\n' "$1" "$2" >> "$STAGES"
}

# run_stage NAME LIMIT_S LOG COMMAND...: runs COMMAND under min(LIMIT_S, time left) seconds.
run_stage() {
  local name=$1 limit=$2 log=$3
  shift 3
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 15 ]; then
    skip "$name" "no time left"
    write_summary
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  # `timeout` runs programs, not shell functions: a stage that is a function runs in bash -c.
  if declare -F "$1" > /dev/null; then set -- bash -c '"$@"' "$name" "$@"; fi
  echo "=== $name (limit ${limit}s) ===" | tee -a "$log"
  local t0
  t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  local status=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="timeout"; elif [ $rc -ne 0 ]; then status="failed (rc $rc)"; fi
  printf '%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - t0))" >> "$STAGES"
  write_summary
  echo "=== $name: $status in $(($(date +%s) - t0)) s ===" | tee -a "$log"
  [ "$status" = ok ]
}

# torch finds the toolkit through CUDA_HOME, else through the `nvcc` on PATH, which may be a
# wrapper outside the toolkit: point it at the toolkit's own directory.
if [ -z "${CUDA_HOME:-}" ]; then
  for candidate in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"; do
    if [ -f "$candidate/include/cuda_runtime.h" ]; then export CUDA_HOME=$candidate; break; fi
  done
fi
# The CUDA toolkit on some images lacks the cuSPARSE headers that torch's CUDA headers include;
# the pip-installed NVIDIA packages carry them.
if [ ! -f "${CUDA_HOME:-/usr/local/cuda}/include/cusparse.h" ]; then
  extra=$("$PY" -c 'import glob, os, site; print(":".join(sorted({os.path.dirname(p) for d in site.getsitepackages() for p in glob.glob(d + "/nvidia/*/include/cusparse.h")})))' 2>/dev/null)
  [ -n "$extra" ] && export CPATH="$extra${CPATH:+:$CPATH}"
fi
SANITIZER=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
export DEVICE_CHECK_SANITIZER=$SANITIZER

# Preflight: everything a later stage needs, each failure named, in seconds. In the dry run a GPU
# is reported, not required; a missing compute-sanitizer only skips the sanitizer stages.
preflight() {
  "$PY" - "$DRY_RUN" <<'EOF'
import os, shutil, subprocess, sys, sysconfig
dry_run = sys.argv[1] == "1"
problems, notes = [], []
print("python", sys.version.split()[0], sys.executable)
include = sysconfig.get_paths()["include"]
if not os.path.exists(os.path.join(include, "Python.h")):
    problems.append(f"no Python.h in {include}: install the Python development headers")
cxx = os.environ.get("CXX", "c++")
if shutil.which(cxx) is None:
    problems.append(f"no C++ compiler ({cxx}) on PATH")
cuda_home = os.environ.get("CUDA_HOME", "")
nvcc = os.path.join(cuda_home, "bin", "nvcc")
if not os.access(nvcc, os.X_OK):
    problems.append(f"no nvcc at {nvcc!r}: set CUDA_HOME to the CUDA toolkit")
else:
    print(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1])
sanitizer = os.environ.get("DEVICE_CHECK_SANITIZER", "")
if sanitizer:
    print("compute-sanitizer:", sanitizer)
else:
    notes.append("no compute-sanitizer: memcheck and racecheck are skipped")
for module in ("torch", "pytest", "numpy", "triton"):
    try:
        __import__(module)
    except Exception as e:
        (notes if module == "triton" else problems).append(f"cannot import {module}: {e}")
try:
    import torch
    from torch.utils.cpp_extension import is_ninja_available
    print("torch", torch.__version__, "built for CUDA", torch.version.cuda)
    if torch.version.cuda is None:
        problems.append("this torch has no CUDA")
    if not is_ninja_available():
        notes.append("no ninja: the build compiles one file at a time (several minutes)")
    if torch.cuda.is_available():
        print("GPU", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
    elif not dry_run:
        problems.append("torch.cuda.is_available() is False: no usable GPU or driver")
    else:
        notes.append("no GPU (dry run)")
except Exception as e:
    problems.append(f"torch: {e}")
for note in notes:
    print("note:", note)
for problem in problems:
    print("PREFLIGHT FAILED:", problem)
sys.exit(1 if problems else 0)
EOF
}

# The dry run reuses an in-place extension that already has the CUDA kernels and is newer than
# every source (CI builds it); otherwise it compiles into $DRY_BUILD, leaving the in-place one
# alone.
reusable_cuda_build() {
  local so
  so=$(ls cram_ext/_C*.so 2>/dev/null | head -n 1)
  [ -n "$so" ] && [ -z "$(find csrc setup.py -newer "$so" -type f | head -n 1)" ] && \
    "$PY" -c "import sys, torch; torch.ops.load_library(sys.argv[1]); sys.exit(0 if torch._C._dispatch_has_kernel_for_dispatch_key('cram_ext::routed_attention_fwd', 'CUDA') else 1)" "$so" 2>/dev/null
}

build() {
  export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS CRAM_EXT_PTXAS_VERBOSE=1
  MAX_JOBS=$(nproc)
  local temp=build/temp_device_check
  if [ $DRY_RUN -eq 1 ]; then
    if reusable_cuda_build; then
      echo "dry run: reusing $(ls cram_ext/_C*.so), built with the CUDA kernels after the last source change"
      return
    fi
    temp=$DRY_BUILD/temp
    "$PY" setup.py build_ext --build-temp "$temp" --build-lib "$DRY_BUILD/lib" || return
  else
    "$PY" setup.py build_ext --inplace --build-temp "$temp" || return
  fi
  # Per-file compile times (start and end, ms): the build estimate above comes from these.
  cat "$temp/.ninja_log" 2>/dev/null || true
}

# The package Python stages will import, from the repository root, with its CUDA kernels.
check_import() {
  local so
  so=$(ls "$ROOT"/cram_ext/_C*.so 2>/dev/null | head -n 1)
  if [ $DRY_RUN -eq 1 ] && ! reusable_cuda_build; then so=$(ls "$DRY_BUILD"/lib/cram_ext/_C*.so); fi
  "$PY" - "$ROOT" "$so" "$DRY_RUN" <<'EOF'
import os, sys, torch
root, so, dry_run = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if dry_run and os.path.dirname(os.path.dirname(so)) != root:
    torch.ops.load_library(so)  # the dry run's build, not the in-place extension
    print("loaded", so)
else:
    import cram_ext
    assert cram_ext.__file__.startswith(root + os.sep), f"cram_ext imported from {cram_ext.__file__}, not {root}"
    print("cram_ext from", cram_ext.__file__)
for op in ("selective_scan_fwd", "selective_scan_bwd", "routed_attention_fwd", "routed_attention_bwd"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"cram_ext::{op}", "CUDA"), f"{op} has no CUDA kernel"
print("CUDA kernels registered for every op")
EOF
}

TESTS=(python_tests/test_cuda_kernels.py python_tests/test_routed_attention.py python_tests/test_selective_scan.py python_tests/test_cram_forward.py python_tests/test_cram_step.py python_tests/test_streaming.py python_tests/test_train.py -k cuda)
XDIST=()
"$PY" -c 'import xdist' 2>/dev/null && XDIST=(-n 4)
BENCH=(env "BENCH_RESULTS_JSONL=$OUT/gpu_bench.jsonl")
COLLECT=()
[ $DRY_RUN -eq 1 ] && COLLECT=(--collect-only)

export DRY_RUN PY ROOT DRY_BUILD
export -f preflight reusable_cuda_build build check_import
{ nvidia-smi 2>&1 | head -n 15; } > "$OUT/build.log" 2>&1
# Once, not per summary: importing torch takes seconds.
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo none)
TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__)' 2>&1 | tail -n 1)
if ! run_stage preflight 60 "$OUT/build.log" preflight; then
  tail -n 20 "$OUT/build.log"
  finish
  exit 1
fi

built=0
run_stage build $([ $DRY_RUN -eq 1 ] && echo 1500 || echo 200) "$OUT/build.log" build && \
  run_stage import 30 "$OUT/build.log" check_import && built=1

if [ $built -eq 1 ]; then
  run_stage tests 150 "$OUT/tests.log" "${PYTEST[@]}" "${XDIST[@]}" "${COLLECT[@]}" "${TESTS[@]}" \
    --junitxml="$OUT/tests.xml"
  for tool in memcheck racecheck; do
    if [ $DRY_RUN -eq 1 ]; then
      run_stage "$tool" 60 "$OUT/sanitizer.log" "$PY" bench/sanitizer_driver.py --device cpu
    elif [ -n "$SANITIZER" ] && [ $SANITIZER_REFUSED -eq 0 ]; then
      run_stage "$tool" 90 "$OUT/sanitizer.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        "$SANITIZER" --tool "$tool" --error-exitcode 1 "$PY" bench/sanitizer_driver.py || \
        sanitizer_refused_device "$tool"
    elif [ $SANITIZER_REFUSED -eq 1 ]; then
      skip "$tool" "compute-sanitizer does not support this device"
    else
      skip "$tool" "no compute-sanitizer"
    fi
  done
  run_stage decisive 90 "$OUT/bench.log" "${BENCH[@]}" "${PYTEST[@]}" "${COLLECT[@]}" \
    bench/test_bench_gpu.py::test_attention_decisive
  run_stage bench 120 "$OUT/bench.log" "${BENCH[@]}" "${PYTEST[@]}" "${COLLECT[@]}" \
    bench/test_bench_gpu.py::test_scan_bandwidth bench/test_bench_gpu.py::test_attention_backward \
    bench/test_bench_gpu.py::test_attention_more
  run_stage fused 90 "$OUT/bench.log" "${BENCH[@]}" "${PYTEST[@]}" "${COLLECT[@]}" \
    bench/test_bench_gpu.py::test_cram_forward
  run_stage training 100 "$OUT/bench.log" "${BENCH[@]}" CRAM_TEST_TIMEOUT_S=90 "${PYTEST[@]}" \
    "${COLLECT[@]}" bench/test_bench_gpu.py::test_training_cpu_preset
  run_stage streaming 75 "$OUT/bench.log" "${BENCH[@]}" "${PYTEST[@]}" "${COLLECT[@]}" \
    bench/test_bench_gpu.py::test_kvcache_decoding bench/test_bench_gpu.py::test_state_update_step \
    bench/test_bench_gpu.py::test_cram_step_decoding
  # A FlexAttention case's first call compiles: a longer per-test limit.
  run_stage flex 150 "$OUT/bench.log" "${BENCH[@]}" CRAM_TEST_TIMEOUT_S=120 "${PYTEST[@]}" \
    "${COLLECT[@]}" bench/test_bench_gpu.py::test_flex_attention
else
  for stage in tests memcheck racecheck decisive bench fused training streaming flex; do skip "$stage" "no build"; done
fi

finish
grep -q '"status": "\(failed\|timeout\)' "$OUT/summary.json" && exit 1
exit 0
