#!/usr/bin/env python3
"""Times commands from process start to a marker on their stdout, and reads
their resident memory (VmRSS) at that moment. Runs the commands alternately,
`--runs` times each, and prints medians and Strata/QEMU ratios.

usage: startbench.py --marker TEXT --runs N NAME=CMD [NAME=CMD ...]
(CMD is split on spaces; the last NAME is the reference the ratios are
taken against.)"""
import argparse, statistics, subprocess, time


def once(cmd, marker):
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    buf = b""
    rss = None
    while True:
        chunk = p.stdout.read1(65536)
        if not chunk:
            break
        buf += chunk
        if marker.encode() in buf:
            elapsed = time.monotonic() - t0
            with open(f"/proc/{p.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1])
            p.kill()
            p.wait()
            return elapsed, rss
    p.kill()
    p.wait()
    raise SystemExit(f"{cmd[0]}: marker {marker!r} not seen; output: {buf[-400:]!r}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--marker", required=True)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("cmds", nargs="+")
    a = ap.parse_args()
    cmds = [(c.split("=", 1)[0], c.split("=", 1)[1].split()) for c in a.cmds]
    res = {n: ([], []) for n, _ in cmds}
    for _ in range(a.runs):
        for name, cmd in cmds:
            t, rss = once(cmd, a.marker)
            res[name][0].append(t)
            res[name][1].append(rss)
    med = {n: (statistics.median(t), statistics.median(r)) for n, (t, r) in res.items()}
    for n, (t, r) in med.items():
        print(f"{n:8s} time {t:.3f} s  (runs: {', '.join(f'{x:.2f}' for x in res[n][0])})  RSS {r/1024:.1f} MiB")
    # The last command is the reference (QEMU); every other one gets its
    # ratio against it.
    names = [n for n, _ in cmds]
    q = names[-1]
    for s in names[:-1]:
        print(f"ratio {q}/{s}: time {med[q][0]/med[s][0]:.2f}x, RSS {med[q][1]/med[s][1]:.2f}x  (>1 means {s} is better)")


main()
