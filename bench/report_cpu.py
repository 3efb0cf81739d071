"""Turns a pytest-benchmark JSON of the CPU benchmarks into the Markdown table of
bench/results/cpu.md (medians and ratios).

    python bench/report_cpu.py bench/results/cpu.json [median|min] > bench/results/cpu.md
"""
import json
import sys

# docs: CRAM_SPEC part C and issue 10 §5 (L = 4096 rows).
TARGETS = {0.016: "≥ 45×", 0.1: "≥ 7×", 1.0: "≥ 0.77× (within 1.3×)"}


def paired(row, key):
    """A ratio measured with the two cases alternating (extra_info), if the benchmark has one."""
    return f"{row[key]:.2f}×" if key in row else ""


def attention_table(rows, stat):
    sdpa = {r["L"]: r[stat] for r in rows if r["kernel"] == "sdpa"}
    lines = [f"| L | routed | rows | routed_attention ms ({stat}) | SDPA ms ({stat}) | speed-up | "
             "speed-up, paired | speed-up, paired warm | target |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted((r for r in rows if r["kernel"] == "routed_attention"), key=lambda r: (r["L"], r["fraction"])):
        base = sdpa.get(r["L"])
        ratio = f"{base / r[stat]:.1f}×" if base else "n/a"
        target = TARGETS.get(r["fraction"], "") if r["L"] == 4096 else ""
        lines.append(f"| {r['L']} | {r['fraction']:.1%} | {r['routed_rows']} | {r[stat] * 1e3:.2f} | "
                     f"{base * 1e3:.2f} | {ratio} | {paired(r, 'paired_speedup')} | "
                     f"{paired(r, 'paired_speedup_warm')} | {target} |")
    return lines


def sparse_keys_table(rows, stat):
    lines = [f"| L | routed | rows | kept keys | routed_attention ms ({stat}) |", "| --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: r["fraction"]):
        lines.append(f"| {r['L']} | {r['fraction']:.1%} | {r['routed_rows']} | {r['kept_keys']} | "
                     f"{r[stat] * 1e3:.2f} |")
    return lines


def scan_table(rows, stat):
    copy = next((r for r in rows if r["kernel"] == "copy"), None)
    copy_bw = copy["bytes"] / copy[stat] if copy else None
    forward = next((r for r in rows if r["kernel"] == "selective_scan" and r["dtype"] == "torch.float32"), None)
    lines = [f"Copy bandwidth measured in the same run: {copy_bw / 1e9:.1f} GB/s (read + write)." if copy_bw else "",
             "", f"| kernel | dtype | shape | {stat} ms | GB/s | share of copy bandwidth | × fp32 forward | "
             "× fp32 forward, paired |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["kernel"] not in ("selective_scan", "selective_scan_fwd_bwd", "selective_scan_ref"):
            continue
        bw = r["bytes"] / r[stat]
        share = f"{bw / copy_bw:.0%}" if copy_bw else "n/a"
        times = f"{r[stat] / forward[stat]:.2f}×" if forward else "n/a"
        if r["kernel"] == "selective_scan_fwd_bwd":
            times += " (target ≤ 4×)"
        lines.append(f"| {r['kernel']} | {r['dtype'].replace('torch.', '')} | {r['shape']} | "
                     f"{r[stat] * 1e3:.1f} | {bw / 1e9:.2f} | {share} | {times} | {paired(r, 'paired_ratio')} |")
    return lines


def main(path, stat="median"):
    """`stat`: "median", or "min" on a shared machine, where the fastest round is the one least
    disturbed by other work."""
    data = json.load(open(path))
    rows = [dict(b["extra_info"], **{stat: b["stats"][stat]}) for b in data["benchmarks"]]
    machine = data["machine_info"]
    print(f"Machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor'))}, "
          f"{machine.get('cpu', {}).get('count', '?')} cores; {data['datetime']}; "
          f"torch threads = cores.\n")
    print("## routed_attention vs causal scaled_dot_product_attention (fp32, batch 1, 8 heads, d=64)\n")
    print("\n".join(attention_table([r for r in rows if r["kernel"] in ("sdpa", "routed_attention")], stat)))
    sparse = [r for r in rows if r["kernel"] == "routed_attention_sparse_keys"]
    if sparse:
        print("\n## routed_attention with a key_mask keeping 5% of the keys (fp32, batch 1, 8 heads, d=64)\n")
        print("\n".join(sparse_keys_table(sparse, stat)))
    print("\n## selective_scan forward, and forward + backward\n")
    print("\n".join(scan_table(rows, stat)))


if __name__ == "__main__":
    main(*sys.argv[1:3])
