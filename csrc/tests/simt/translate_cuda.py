"""Turns a CUDA source into C++ for the SIMT emulator (simt.h): each launch
`kernel<<<grid, block, smem, stream>>>(args);` becomes `::simt::launch(::simt::LaunchConfig(grid, block, smem,
stream), kernel, args);` each `extern __shared__ T name[];` the block's dynamic shared memory, and each other `__shared__`
variable is registered with the emulator, which fills it with 0xff bytes before every block.

    python translate_cuda.py IN.cu OUT.cpp
"""
import re
import sys

# The kernel expression before `<<<`: a possibly qualified name with optional template arguments.
KERNEL = re.compile(r"([A-Za-z_][\w:]*(?:<[^;{}()]*>)?)\s*$")
DYNAMIC_SMEM = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w\s]+?)\s+(\w+)\[\]\s*;")
STATIC_SMEM = re.compile(r"(?<!extern )__shared__\s+([^;]+);")
# The names a declaration declares: identifiers followed by `[`, `,` or its end.
DECLARED = re.compile(r"(?:^|[\s,])([A-Za-z_]\w*)\s*(?=\[|,|$)")


def closing_paren(text, open_at):
    depth = 0
    for i in range(open_at, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    raise SystemExit(f"unbalanced parentheses after offset {open_at}")


def translate_launches(text):
    out, pos = [], 0
    while (start := text.find("<<<", pos)) >= 0:
        kernel = KERNEL.search(text, pos, start)
        if not kernel:
            raise SystemExit(f"no kernel name before <<< at offset {start}")
        config_end = text.index(">>>", start)
        args_open = text.index("(", config_end)
        args_close = closing_paren(text, args_open)
        config = text[start + 3:config_end].strip()
        args = text[args_open + 1:args_close].strip()
        out.append(text[pos:kernel.start(1)])
        out.append(f"::simt::launch(::simt::LaunchConfig({config}), {kernel.group(1)}{', ' + args if args else ''})")
        pos = args_close + 1
    out.append(text[pos:])
    return "".join(out)


def register_shared(match):
    names = DECLARED.findall(match.group(1))
    return match.group(0) + "".join(f" ::simt::shared_region({name});" for name in names)


def translate(text):
    text = DYNAMIC_SMEM.sub(r"\1* \2 = ::simt::dynamic_shared<\1>();", text)
    text = STATIC_SMEM.sub(register_shared, text)
    return translate_launches(text)


if __name__ == "__main__":
    source, target = sys.argv[1:]
    with open(source) as f:
        text = f.read()
    with open(target, "w") as f:
        f.write(f'#line 1 "{source}"\n')  # launches stay on their lines: reports name the .cu
        f.write(translate(text))
