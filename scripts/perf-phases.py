#!/usr/bin/env python3
"""Splits a `perf script -F pid,time,ip,sym,dso` dump of `connect --floor` into phases.

Each sample goes to the connect or the close phase of its process (20 ms buckets, by
whether accept4 or close leads in the bucket) and to the outermost syscall on its stack
(`__x64_sys_*`), or to user space when its leaf frame is not in the kernel. Prints each
process's share per phase and its hottest user-space functions in the connect phase.

    perf script -i ph.data -F pid,time,ip,sym,dso > ph.txt
    scripts/perf-phases.py ph.txt GATEWAY_PID BARE_ECHO_PID
"""
import collections
import re
import sys


def samples(path):
    cur = None
    for line in open(path):
        head = re.match(r"\s*(\d+)\s+([\d.]+):", line)
        if head and not line.startswith("\t"):
            if cur:
                yield cur
            cur = {"pid": int(head.group(1)), "t": float(head.group(2)), "user": None,
                   "sys": None, "leaf": None}
            continue
        frame = re.match(r"\s*[0-9a-f]+\s+(.*)\s+\((.*)\)\s*$", line)
        if not frame or cur is None:
            continue
        sym, dso = frame.groups()
        if cur["user"] is None:
            cur["user"] = "kernel" not in dso
            cur["leaf"] = sym
        m = re.match(r"__x64_sys_(\w+)", sym)
        if m:
            cur["sys"] = m.group(1)  # the last one seen is the outermost
    if cur:
        yield cur


def main():
    path, pids = sys.argv[1], [int(p) for p in sys.argv[2:]]
    got = [s for s in samples(path) if s["pid"] in pids]
    buckets = collections.defaultdict(collections.Counter)
    for s in got:
        buckets[(s["pid"], int(s["t"] * 50))][s["sys"]] += 1
    share = collections.defaultdict(collections.Counter)
    hot = collections.defaultdict(collections.Counter)
    for s in got:
        b = buckets[(s["pid"], int(s["t"] * 50))]
        phase = "connect" if b["accept4"] >= b["close"] else "close"
        what = "user" if s["user"] else (s["sys"] or "other kernel")
        share[(s["pid"], phase)][what] += 1
        if s["user"] and phase == "connect":
            hot[s["pid"]][s["leaf"]] += 1
    for (pid, phase), c in sorted(share.items()):
        n = sum(c.values())
        parts = ", ".join(f"{k} {100 * v / n:.1f}%" for k, v in c.most_common(8))
        print(f"pid {pid} {phase}: {n} samples: {parts}")
    for pid in pids:
        n = sum(share[(pid, "connect")].values()) or 1
        print(f"pid {pid}: hottest user-space functions in the connect phase")
        for sym, v in hot[pid].most_common(15):
            print(f"  {100 * v / n:5.2f}%  {sym[:100]}")


if __name__ == "__main__":
    main()
