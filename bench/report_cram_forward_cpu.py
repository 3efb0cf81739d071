"""Markdown table of bench/test_bench_cram_forward_cpu.py's JSON (pytest-benchmark):

    python bench/report_cram_forward_cpu.py bench/results/cram_forward_cpu.json

Times are the interleaved minima of `extra_info` (milliseconds); "speed-up" is the composed
layer's time over the fused layer's, "op / parts" the fused op's over the sum of its parts.
"""
import json
import sys


def main(path):
    print("| d_model | L | routed | attention rows | semantic rows | composed layer | fused layer "
          "| speed-up | fused op | scan | attention | GEMMs | sum of parts | op / parts |")
    print("| --- " * 14 + "|")
    for bench in json.load(open(path))["benchmarks"]:
        e = bench["extra_info"]
        ms = {k: f"{v * 1e3:.0f}" for k, v in e.items() if k.endswith("_s")}
        print(f"| {e['d_model']} | {e['L']} | {e['fraction']:.0%} | {e['attention_rows']} "
              f"| {e['semantic_rows']} | {ms['layer_composed_s']} | {ms['layer_fused_s']} "
              f"| {e['layer_speedup']:.2f}× | {ms['fused_op_s']} | {ms['scan_s']} "
              f"| {ms['attention_s']} | {ms['gemms_s']} | {ms['parts_sum_s']} "
              f"| {e['op_over_parts']:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1])
