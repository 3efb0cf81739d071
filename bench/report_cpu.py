"""Turns a pytest-benchmark JSON of the CPU benchmarks into the Markdown table of
bench/results/cpu.md (medians and ratios).

    python bench/report_cpu.py bench/results/cpu.json > bench/results/cpu.md
"""
import json
import sys

TARGETS = {0.016: "≥ 40×", 0.1: "≥ 7×", 1.0: "≥ 0.77× (within 1.3×)"}


def attention_table(rows):
    sdpa = {r["L"]: r["median"] for r in rows if r["kernel"] == "sdpa"}
    lines = ["| L | routed | rows | routed_attention ms | SDPA ms | speed-up | target |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted((r for r in rows if r["kernel"] == "routed_attention"), key=lambda r: (r["L"], r["fraction"])):
        base = sdpa.get(r["L"])
        ratio = f"{base / r['median']:.1f}×" if base else "n/a"
        target = TARGETS.get(r["fraction"], "") if r["L"] == 4096 else ""
        lines.append(f"| {r['L']} | {r['fraction']:.1%} | {r['routed_rows']} | {r['median'] * 1e3:.2f} | "
                     f"{base * 1e3:.2f} | {ratio} | {target} |")
    return lines


def scan_table(rows):
    copy = next((r for r in rows if r["kernel"] == "copy"), None)
    copy_bw = copy["bytes"] / copy["median"] if copy else None
    lines = [f"Copy bandwidth measured in the same run: {copy_bw / 1e9:.1f} GB/s (read + write)." if copy_bw else "",
             "", "| kernel | dtype | shape | median ms | GB/s | share of copy bandwidth |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["kernel"] not in ("selective_scan", "selective_scan_ref"):
            continue
        bw = r["bytes"] / r["median"]
        share = f"{bw / copy_bw:.0%}" if copy_bw else "n/a"
        lines.append(f"| {r['kernel']} | {r['dtype'].replace('torch.', '')} | {r['shape']} | "
                     f"{r['median'] * 1e3:.1f} | {bw / 1e9:.2f} | {share} |")
    return lines


def main(path):
    data = json.load(open(path))
    rows = [dict(b["extra_info"], median=b["stats"]["median"]) for b in data["benchmarks"]]
    machine = data["machine_info"]
    print(f"Machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor'))}, "
          f"{machine.get('cpu', {}).get('count', '?')} cores; {data['datetime']}; "
          f"torch threads = cores.\n")
    print("## routed_attention vs causal scaled_dot_product_attention (fp32, batch 1, 8 heads, d=64)\n")
    print("\n".join(attention_table([r for r in rows if r["kernel"] in ("sdpa", "routed_attention")])))
    print("\n## selective_scan forward\n")
    print("\n".join(scan_table(rows)))


if __name__ == "__main__":
    main(sys.argv[1])
