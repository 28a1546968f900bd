#!/bin/sh
# [JOBS] Mirror and backup throughput, Strata against QEMU 7.2 running the
# same QMP sequence: a 4 GiB qcow2 image holding 1 GiB of data (every
# fourth MiB written), `drive-mirror sync=full` to a new qcow2 completed
# with a pivot, and `drive-backup sync=full` to a new qcow2. Both VMMs run
# without a guest (`-machine none`, KVM), the images
# on tmpfs (/dev/shm) so that the figure is the VMM's copying, not the
# disk. Runs alternate between the VMMs; the table gives the median and
# the spread (min-max) of the MiB/s of each.
#
# usage: bench/jobs.sh [runs]   (default 5)
# Env: QEMU=/path/to/qemu-system-x86_64 (default: bench/qemu-local.sh)
set -eu
cd "$(dirname "$0")/.."
runs=${1:-5}
cargo build --release --bin strata >/dev/null
qemu=${QEMU:-$(sh bench/qemu-local.sh)}
dir=$(mktemp -d /dev/shm/strata-jobs.XXXXXX)
trap 'rm -rf "$dir"' EXIT
src="$dir/src.qcow2"
qemu-img create -q -f qcow2 "$src" 4G
cmds=""
i=0
while [ $i -lt 1024 ]; do cmds="$cmds -c 'write -P 0x5a $((i * 4))M 1M'"; i=$((i + 1)); done
eval qemu-io -f qcow2 $cmds "$src" >/dev/null
python3 - "$runs" "$qemu" "$dir" "$src" <<'PY'
import json, os, socket, statistics, subprocess, sys, time

runs, qemu, d, src = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
vmms = {"strata": ["target/release/strata"], "qemu": [qemu, "-accel", "kvm"]}

def qmp(path):
    for _ in range(200):
        try:
            s = socket.socket(socket.AF_UNIX); s.connect(path); break
        except OSError:
            time.sleep(0.05)
    f = s.makefile("rw")
    f.readline()
    def cmd(name, args=None):
        f.write(json.dumps({"execute": name, "arguments": args or {}}) + "\n"); f.flush()
        while True:
            v = json.loads(f.readline())
            if "return" in v or "error" in v:
                if "error" in v:
                    raise RuntimeError(f"{name}: {v}")
                return v["return"]
    def event(name):
        while True:
            v = json.loads(f.readline())
            if v.get("event") == name:
                return v
    return cmd, event

def one(vmm, op):
    sock = f"{d}/qmp-{vmm}.sock"
    tgt = f"{d}/tgt-{vmm}.qcow2"
    for p in (sock, tgt):
        if os.path.exists(p): os.unlink(p)
    p = subprocess.Popen(vmms[vmm] + ["-machine", "none", "-nodefaults", "-display", "none",
        "-qmp", f"unix:{sock},server=on,wait=off",
        "-drive", f"if=none,id=d0,file={src},format=qcow2,cache=writeback"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        cmd, event = qmp(sock)
        cmd("qmp_capabilities")
        t = time.monotonic()
        if op == "mirror":
            cmd("drive-mirror", {"device": "d0", "job-id": "j", "target": tgt, "format": "qcow2", "sync": "full"})
            event("BLOCK_JOB_READY")
            cmd("block-job-complete", {"device": "j"})
        else:
            cmd("drive-backup", {"device": "d0", "job-id": "j", "target": tgt, "format": "qcow2", "sync": "full"})
        event("BLOCK_JOB_COMPLETED")
        dt = time.monotonic() - t
        cmd("quit")
    finally:
        p.wait(timeout=60)
    return 1024 / dt

res = {(v, o): [] for v in vmms for o in ("mirror", "backup")}
for r in range(runs):
    for o in ("mirror", "backup"):
        for v in (("strata", "qemu") if r % 2 == 0 else ("qemu", "strata")):
            res[(v, o)].append(one(v, o))
print(f"date: {time.strftime('%Y-%m-%d')}, {runs} alternating runs, images on tmpfs")
print("| operation | Strata MiB/s median (min-max) | QEMU MiB/s median (min-max) | Strata/QEMU |")
print("|---|---|---|---|")
for o in ("mirror", "backup"):
    s, q = res[("strata", o)], res[("qemu", o)]
    fmt = lambda x: f"{statistics.median(x):.0f} ({min(x):.0f}-{max(x):.0f})"
    print(f"| {o} 4 GiB, 1 GiB data | {fmt(s)} | {fmt(q)} | {statistics.median(s)/statistics.median(q):.2f} |")
PY
