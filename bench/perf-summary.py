#!/usr/bin/env python3
"""Summarises `perf script` output of the ovl-mount daemon (bench/profile.sh perf):
CPU samples per FUSE operation (outermost ovl::engine::fs::OverlayFs frame), per innermost ovl::
function, per syscall-ish kernel entry, and the share of samples resolving /proc/self/fd
magic links.   perf script -i FILE.data | bench/perf-summary.py"""
import collections
import re
import sys

ops = collections.Counter()
inner = collections.Counter()
sysc = collections.Counter()
procfd = collections.Counter()
total = 0
stack = []


def flush():
    global total
    if not stack:
        return
    total += 1
    fs_op = next((f for f in reversed(stack) if "OverlayFs as fuser::Filesystem>::" in f), None)
    op = fs_op.split(">::")[-1] if fs_op else ("fuser: read request" if any("receive" in f for f in stack) else "other")
    ops[op] += 1
    ovl = next((f for f in stack if f.startswith("ovl::")), None)
    inner[ovl or "(no ovl frame)"] += 1
    # The kernel function right below do_syscall_64 names the syscall (x64_sys_call is inlined).
    k = next((stack[i - 1] for i in range(1, len(stack)) if stack[i] == "do_syscall_64"), None)
    sysc[k if k else "(user space)"] += 1
    if any(f.startswith(("proc_", "pid_", "tid_fd_")) for f in stack):
        procfd[op] += 1


for line in sys.stdin:
    line = line.rstrip("\n")
    if not line.strip():
        flush()
        stack = []
        continue
    m = re.match(r"^\s+[0-9a-f]+\s+(.+?)\s+\(", line)
    if m:
        sym = re.sub(r"\+0x[0-9a-f]+$", "", m.group(1))
        sym = re.sub(r"<ovl::engine::\w+::OverlayFs as", "<OverlayFs as", sym) if "fs::OverlayFs" not in sym else sym
        sym = re.sub(r"^ovl::engine::(\w+)::<impl ovl::engine::overlay::Overlay>::", r"ovl::\1::", sym)
        stack.append(sym)
flush()


def show(title, c, n=15):
    print(f"\n{title} (of {total} samples)")
    for k, v in c.most_common(n):
        print(f"  {100 * v / total:5.1f}%  {k}")


show("CPU by FUSE operation", ops)
show("CPU by innermost ovl function", inner, 20)
show("CPU by syscall", sysc, 15)
print(f"\nsamples inside procfs (resolving /proc/self/fd/N magic links): {sum(procfd.values())} "
      f"({100 * sum(procfd.values()) / max(total, 1):.1f}%), by op: {dict(procfd.most_common(6))}")
