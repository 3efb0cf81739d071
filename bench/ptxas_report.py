"""The CUDA kernels' registers and spills, per kernel and architecture, as a Markdown table, read
from the ptxas reports of a build with CRAM_EXT_PTXAS_VERBOSE=1:

    CRAM_EXT_PTXAS_VERBOSE=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" python setup.py build_ext \\
        --build-temp /tmp/ptxas_build --build-lib /tmp/ptxas_lib > build.log 2>&1
    python bench/ptxas_report.py build.log

(bench/device_check.sh's build stage writes such a log to $OUT/build.log, for sm_90 only.)
Each cell: registers / spill stores + spill loads (bytes). Instantiations of one kernel with the
same numbers share a row.
"""
import argparse
import re
import subprocess
from collections import defaultdict

ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+a?)'")
SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
REGISTERS = re.compile(r"Used (\d+) registers")


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return dict(zip(names, out))


def kernel_and_types(signature):
    """'void cram::cuda::(anonymous namespace)::k<float, 64>(...)' -> ('k', 'float, 64')."""
    m = re.match(r"(?:void )?([\w:]+?)(?:<(.*)>)?\(", signature.replace("(anonymous namespace)::", ""))
    return m.group(1).split("::")[-1], m.group(2) or "-"


def parse(log):
    """{(mangled name, arch): (registers, spill stores, spill loads)} from ptxas's -v output."""
    reports, current, spill = {}, None, (0, 0)
    for line in log:
        if m := ENTRY.search(line):
            current, spill = (m.group(1), m.group(2)), (0, 0)
        elif current and (m := SPILL.search(line)):
            spill = (int(m.group(1)), int(m.group(2)))
        elif current and (m := REGISTERS.search(line)):
            reports[current] = (int(m.group(1)), *spill)
            current = None
    return reports


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log")
    args = parser.parse_args()
    with open(args.log, errors="replace") as f:
        reports = parse(f)
    if not reports:
        raise SystemExit(f"no ptxas reports in {args.log}: build with CRAM_EXT_PTXAS_VERBOSE=1")
    names = demangle(sorted({name for name, _ in reports}))
    archs = sorted({arch for _, arch in reports})
    rows = defaultdict(list)  # (kernel, numbers per arch) -> template arguments
    for mangled in sorted(names):
        kernel, types = kernel_and_types(names[mangled])
        numbers = tuple(reports.get((mangled, arch)) for arch in archs)
        rows[(kernel, numbers)].append(types)
    print("| kernel | instantiations | " + " | ".join(archs) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in archs) + " |")
    for (kernel, numbers), types in sorted(rows.items()):
        cells = " | ".join(f"{n[0]} / {n[1]}+{n[2]}" if n else "-" for n in numbers)
        print(f"| {kernel} | {'; '.join(types)} | {cells} |")


if __name__ == "__main__":
    main()
