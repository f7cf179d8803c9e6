"""Registers, stack and spills of every kernel instantiation in two `ptxas -v` logs, side by side (no GPU needed).

    (cd OLD && nvcc -c csrc/cuda/qmatmul.cu -o /tmp/a.o -O3 -std=c++17 -Icsrc --use_fast_math \\
        -gencode arch=compute_90,code=sm_90 -Xptxas -v > /tmp/old.log 2>&1)
    (same for NEW > /tmp/new.log)
    python3 dev/cuda/ptxas_diff.py /tmp/old.log /tmp/new.log [--match qgemv_dp_kernel]

Prints the instantiations whose (registers, stack bytes, spill-store bytes) differ, or that exist in one log only, then
a count. Names are demangled with c++filt; a last template argument of false / true reads as 0 / 1, so a bool
parameter that became an int mode still pairs up. The dp2a decode GEMV is sensitive to its register budget (a loop
or a call that keeps more values live made it spill and lose a third of its speed, dev/cuda/NOTES.md): compare before
spending device time.
"""
from __future__ import annotations

import argparse
import re
import subprocess


def parse(path, match):
    raw, cur = {}, None
    with open(path) as fh:
        for line in fh:
            m = re.search(r"Compiling entry function '(\w+)'", line)
            if m:
                cur = m.group(1)
                raw[cur] = {}
                continue
            if cur is None:
                continue
            m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", line)
            if m:
                raw[cur].update(stack=int(m.group(1)), spill=int(m.group(2)))
            m = re.search(r"Used (\d+) registers", line)
            if m:
                raw[cur]["regs"] = int(m.group(1))
    names = list(raw)
    dem = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    out = {}
    for n, d in zip(names, dem.split("\n")):
        if match not in d:
            continue
        k = d[:d.index(">(") + 1] if ">(" in d else d
        k = k.replace("__nv_bfloat16", "bf16").replace("(int)", "")
        k = re.sub(r", false>$", ", 0>", k)
        k = re.sub(r", true>$", ", 1>", k)
        out[k] = tuple(raw[n].get(x) for x in ("regs", "stack", "spill"))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--match", default="qgemv_dp_kernel", help="only kernels whose demangled name contains this")
    a = ap.parse_args()
    old, new = parse(a.old, a.match), parse(a.new, a.match)
    same = 0
    for k in sorted(set(old) | set(new)):
        if old.get(k) == new.get(k):
            same += 1
            continue
        print(f"{k}  old (regs, stack, spill) {old.get(k)}  new {new.get(k)}")
    print(f"{same} the same, {len(set(old) | set(new)) - same} differ or are new")


if __name__ == "__main__":
    main()
