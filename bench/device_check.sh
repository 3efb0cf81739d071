#!/usr/bin/env bash
# One pass of every check that needs a CUDA GPU, for a machine with one H100/H200 and no network:
#
#   OUT=/some/dir bash bench/device_check.sh      (from the repository root)
#
# Stages, each under `timeout` and all under one deadline (DEVICE_CHECK_BUDGET_S, default 470 s,
# so the whole run ends inside 8 minutes even if a stage hangs):
#   build      the extension with the CUDA kernels for sm_90 (setup.py build_ext --inplace)
#   tests      python_tests/test_cuda_kernels.py (junit XML)
#   memcheck   compute-sanitizer --tool memcheck over bench/sanitizer_driver.py
#   racecheck  compute-sanitizer --tool racecheck over the same driver
#   bench      bench/test_bench_gpu.py (pytest-benchmark JSON, plus the incremental results JSON)
# A stage whose predecessor failed in a way that makes it meaningless (no build) is skipped.
# Results (8 files at most, the device tool's limit), all under $OUT:
#   summary.json  stage -> {status, seconds}, GPU name, torch version, date
#   build.log  tests.xml  tests.log  sanitizer.log  bench.log  gpu_bench.json  gpu_bench_results.json
set -u
OUT=${OUT:?set OUT to the output directory}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
START=$(date +%s)
BUDGET=${DEVICE_CHECK_BUDGET_S:-470}
STAGES=$(mktemp)  # stage records; outside $OUT, which may return 8 files at most

write_summary() {
  "$PY" - "$STAGES" "$OUT/summary.json" <<'EOF'
import json, subprocess, sys, time
stages = {}
for line in open(sys.argv[1]):
    name, status, seconds = line.rstrip("\n").split("\t")
    stages[name] = {"status": status, "seconds": int(seconds)}
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as e:  # no driver tools: say so
    gpu = f"unavailable ({e})"
try:
    import torch
    torch_version = torch.__version__
except Exception as e:
    torch_version = f"unavailable ({e})"
json.dump({"stages": stages, "gpu": gpu, "torch": torch_version,
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
          open(sys.argv[2], "w"), indent=1)
EOF
}

# run_stage NAME LIMIT_S LOG COMMAND...: runs COMMAND under min(LIMIT_S, time left) seconds.
run_stage() {
  local name=$1 limit=$2 log=$3
  shift 3
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 15 ]; then
    printf '%s\tskipped (no time left)\t0\n' "$name" >> "$STAGES"
    write_summary
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s) ===" | tee -a "$log"
  local t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  local status=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="timeout"; elif [ $rc -ne 0 ]; then status="failed (rc $rc)"; fi
  printf '%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - t0))" >> "$STAGES"
  write_summary
  echo "=== $name: $status ===" | tee -a "$log"
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

{ nvidia-smi; "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'; nvcc --version; } > "$OUT/build.log" 2>&1

built=0
run_stage build 200 "$OUT/build.log" env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 CRAM_EXT_PTXAS_VERBOSE=1 \
  "$PY" setup.py build_ext --inplace && built=1

if [ $built -eq 1 ]; then
  xdist=""
  "$PY" -c 'import xdist' 2>/dev/null && xdist="-n 4"
  run_stage tests 130 "$OUT/tests.log" "$PY" -m pytest -q -p no:cacheprovider $xdist \
    python_tests/test_cuda_kernels.py --junitxml="$OUT/tests.xml"

  if command -v compute-sanitizer > /dev/null; then
    SANITIZER=compute-sanitizer
  else
    SANITIZER=$(ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
  fi
  if [ -n "$SANITIZER" ]; then
    for tool in memcheck racecheck; do
      run_stage "$tool" 60 "$OUT/sanitizer.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        "$SANITIZER" --tool "$tool" --error-exitcode 1 "$PY" bench/sanitizer_driver.py
    done
  else
    printf 'memcheck\tskipped (no compute-sanitizer)\t0\nracecheck\tskipped (no compute-sanitizer)\t0\n' >> "$STAGES"
  fi

  run_stage bench 150 "$OUT/bench.log" env BENCH_RESULTS_JSON="$OUT/gpu_bench_results.json" \
    "$PY" -m pytest -q -p no:cacheprovider bench/test_bench_gpu.py --benchmark-json="$OUT/gpu_bench.json"
else
  printf 'tests\tskipped (build failed)\t0\nmemcheck\tskipped (build failed)\t0\nracecheck\tskipped (build failed)\t0\nbench\tskipped (build failed)\t0\n' >> "$STAGES"
fi

write_summary
rm -f "$STAGES"
cat "$OUT/summary.json"
