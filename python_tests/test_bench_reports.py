"""The scripts that turn a device run's raw output into the tables of bench/results and
bench/GPU_NOTES.md: they run after the GPU is gone, on what it left."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, *args):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_report_gpu_tables_every_kind_and_lists_the_failures(tmp_path):
    records = [
        {"kind": "cram_forward", "d_model": 64, "L": 2048, "fused_op_eager_ms": 1.25,
         "op_over_parts": 1.0412, "test": "t1"},
        {"kind": "cram_forward", "d_model": 256, "L": 8192, "fused_op_eager_ms": None,
         "fused_op_eager_error": "capture | failed", "test": "t2"},
        {"kind": "scan_forward", "ms": 123.4, "gbs": 2987.6, "test": "t3"},
        {"kind": "outcome", "test": "bench/x.py::a", "when": "call", "outcome": "passed"},
        {"kind": "outcome", "test": "bench/x.py::b", "when": "call", "outcome": "failed",
         "error": "AssertionError: slow"},
    ]
    jsonl, summary = tmp_path / "gpu_bench.jsonl", tmp_path / "summary.json"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary.write_text(json.dumps({"gpu": "NVIDIA H200", "torch": "2.11.0+cu130",
                                   "date": "2026-12-05T00:00:00Z", "dry_run": False,
                                   "stages": {"build": {"status": "ok", "seconds": 70}}}))
    report = run_script("report_gpu.py", str(jsonl), "--summary", str(summary))
    assert report.startswith("GPU: NVIDIA H200; torch 2.11.0+cu130; 2026-12-05T00:00:00Z\n")
    assert "| build | ok | 70 |" in report
    cram = report.split("## cram_forward\n\n")[1].split("\n\n")[0].splitlines()
    assert cram[0] == ("| d_model | L | fused_op_eager_ms | op_over_parts | "
                       "fused_op_eager_error |")
    assert cram[2] == "| 64 | 2048 | 1.25 | 1.04 | – |"
    assert cram[3] == "| 256 | 8192 | – | – | capture / failed |"
    assert "| 123 | 2988 |" in report.split("## scan_forward")[1]
    assert "1 passed, 1 not passed" in report
    assert "| bench/x.py::b | call | failed | AssertionError: slow |" in report


PTXAS_LOG = """\
ptxas info    : Compiling entry function '_ZN4cram4cuda12_GLOBAL__N_115simt_fwd_kernelIfEEvv' for 'sm_80'
ptxas info    : Function properties for _ZN4cram4cuda12_GLOBAL__N_115simt_fwd_kernelIfEEvv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 46 registers, used 0 barriers, 4096 bytes smem
ptxas info    : Compiling entry function '_ZN4cram4cuda12_GLOBAL__N_115simt_fwd_kernelIdEEvv' for 'sm_80'
ptxas info    : Function properties for _ZN4cram4cuda12_GLOBAL__N_115simt_fwd_kernelIdEEvv
    8 bytes stack frame, 16 bytes spill stores, 24 bytes spill loads
ptxas info    : Used 56 registers, used 0 barriers, 8192 bytes smem
ptxas info    : Compiling entry function '_ZN4cram4cuda12_GLOBAL__N_115simt_fwd_kernelIfEEvv' for 'sm_90'
ptxas info    : Function properties for _ZN4cram4cuda12_GLOBAL__N_115simt_fwd_kernelIfEEvv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 44 registers, used 0 barriers, 4096 bytes smem
"""


def test_ptxas_report_reads_registers_and_spills_per_architecture(tmp_path):
    log = tmp_path / "build.log"
    log.write_text(PTXAS_LOG)
    rows = run_script("ptxas_report.py", str(log)).splitlines()
    assert rows[0] == "| kernel | instantiations | sm_80 | sm_90 |"
    assert "| simt_fwd_kernel | double | 56 / 16+24 | - |" in rows
    assert "| simt_fwd_kernel | float | 46 / 0+0 | 44 / 0+0 |" in rows
