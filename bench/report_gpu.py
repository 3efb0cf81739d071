"""Markdown tables of a device run's measurements: one table per kind of record in
bench/device_check.sh's gpu_bench.jsonl, with the columns that kind has, then the tests and
benchmarks that failed. With the run's summary.json, a header of card, torch, date and stages.

    python bench/report_gpu.py $OUT/gpu_bench.jsonl --summary $OUT/summary.json

The device_check run writes one JSON line per measurement (`kind`: routed_attention_forward,
scan_forward, cram_forward, kvcache_decoding, ...) and one per test outcome (`kind: outcome`).
"""
import argparse
import json
from collections import defaultdict

HIDDEN = ("kind", "test")


def cell(value):
    if value is None:
        return "–"
    if isinstance(value, int):   # bool too
        return str(value)
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)[:80].replace("|", "/")


def table(records):
    columns = list(dict.fromkeys(k for r in records for k in r if k not in HIDDEN))
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in records]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("jsonl")
    parser.add_argument("--summary", help="the run's summary.json")
    args = parser.parse_args()
    if args.summary:
        with open(args.summary) as f:
            summary = json.load(f)
        print(f"GPU: {summary['gpu']}; torch {summary['torch']}; {summary['date']}"
              f"{' (dry run)' if summary.get('dry_run') else ''}\n")
        print(table([{"stage": name, **stage} for name, stage in summary["stages"].items()]))
        print()
    by_kind = defaultdict(list)
    with open(args.jsonl) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                by_kind[record.get("kind", "?")].append(record)
    outcomes = by_kind.pop("outcome", [])
    for kind, records in by_kind.items():
        print(f"## {kind}\n\n{table(records)}\n")
    failed = [r for r in outcomes if r.get("outcome") != "passed"]
    print(f"## Outcomes\n\n{len(outcomes) - len(failed)} passed, {len(failed)} not passed")
    if failed:
        print()
        print(table([{"node": r["test"], "when": r.get("when"), "outcome": r.get("outcome"),
                      "error": r.get("error")} for r in failed]))


if __name__ == "__main__":
    main()
