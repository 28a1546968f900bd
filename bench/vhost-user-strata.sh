#!/bin/sh
# Strata's two virtio-blk data paths behind the same Linux guest under
# KVM: the in-process virtio-blk-pci (its queues on an iothread of the VMM)
# against vhost-user-blk-pci with the queues in strata-storage-daemon, and
# in qemu-storage-daemon. Same image (raw, /dev/shm), same guest workload:
# /init's `iops=vda:4:N iops=vda:64:M` (O_DIRECT, queue depth 1, random
# aligned offsets, timed by the guest clock; see images/linux-init/init.c).
# Guest RAM is a shared memfd in every case (`-object
# memory-backend-memfd`), so only the data path differs.
#
# usage: bench/vhost-user-strata.sh [runs] [count-4k] [count-64k]
#   (defaults 5, 4000, 1000; runs alternate the order of the three)
set -eu
cd "$(dirname "$0")/.."
runs=${1:-5}
n4=${2:-4000}
n64=${3:-1000}
sh images/build.sh >/dev/null
cargo build --release --bin strata --bin strata-storage-daemon >/dev/null 2>&1
guest=$(images/linux-kernel/build.sh)
python3 - "$runs" "$n4" "$n64" "$guest/vmlinux" images/out/linux-lane.cpio <<'PY'
import os, re, statistics, subprocess, sys, tempfile, time
runs, n4, n64, kernel, initrd = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
tmp = tempfile.mkdtemp(prefix="vu-strata-")
img = "/dev/shm/strata-vu-strata-bench.img"
with open(img, "wb") as f:
    f.truncate(256 << 20)
sock = os.path.join(tmp, "vu.sock")
cmdline = ("console=ttyS0 quiet lpj=1000000 tsc=reliable no_timer_check "
           "clearcpuid=xsave,smap,fsgsbase,rdrand,rdseed,popcnt,invpcid,pcid,rdpid,erms,fsrm "
           "rodata=off iops=vda:4:%d iops=vda:64:%d" % (n4, n64))
mem = ["-m", "256", "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
       "-machine", "pc,memory-backend=mem"]
daemons = {"strata-storage-daemon": "target/release/strata-storage-daemon",
           "qemu-storage-daemon": "/usr/bin/qemu-storage-daemon"}
def case(name):
    if name == "in-process":
        return None, ["-drive", "file=%s,format=raw,if=none,id=d,cache=none,aio=io_uring" % img,
                      "-device", "virtio-blk-pci,drive=d"]
    return daemons[name], ["-chardev", "socket,id=vu,path=" + sock,
                           "-device", "vhost-user-blk-pci,chardev=vu"]
def once(name):
    daemon, dev = case(name)
    d = None
    if daemon:
        if os.path.exists(sock):
            os.unlink(sock)
        d = subprocess.Popen([daemon, "--blockdev",
            "driver=file,node-name=f,filename=%s,cache.direct=on,aio=io_uring" % img,
            "--export", "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=%s,writable=on" % sock],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t = time.monotonic()
        while not os.path.exists(sock) and time.monotonic() - t < 10:
            time.sleep(0.01)
    log = os.path.join(tmp, "serial.log")
    if os.path.exists(log):
        os.unlink(log)
    p = subprocess.Popen(["target/release/strata"] + mem + ["-nodefaults", "-serial", "file:" + log,
        "-kernel", kernel, "-initrd", initrd, "-append", cmdline] + dev,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    res = {}
    t0 = time.monotonic()
    while time.monotonic() - t0 < 300:
        text = open(log, "rb").read().decode("latin-1") if os.path.exists(log) else ""
        for m in re.finditer(r"GUEST-IOPS vda (\w+) (\d+) \d+ \d+ (\d+)", text):
            res["%s-%sk" % (m.group(1), m.group(2))] = int(m.group(3))
        if "GUEST-DONE" in text or "GUEST-ERR" in text or p.poll() is not None:
            break
        time.sleep(0.1)
    p.kill(); p.wait()
    if d:
        d.terminate(); d.wait()
    print("run %s: %s" % (name, res), file=sys.stderr)
    return res
names = ["in-process", "strata-storage-daemon", "qemu-storage-daemon"]
results = {n: [] for n in names}
for r in range(runs):
    order = names[r % 3:] + names[:r % 3]
    for n in order:
        results[n].append(once(n))
keys = ["write-4k", "read-4k", "write-64k", "read-64k"]
def cell(n, k):
    v = [x[k] for x in results[n] if k in x]
    if not v:
        return "-", None
    med = statistics.median(v)
    return "%d (%d-%d)" % (med, min(v), max(v)), med
print("# %d runs each, median (min-max); Strata KVM guest, image %s (cache=none, io_uring)" % (runs, img))
print("| workload (QD1) IOPS | in-process virtio-blk | vhost-user: strata-storage-daemon | vhost-user: qemu-storage-daemon | strata-sd / in-process | strata-sd / qemu-sd |")
print("|---|---|---|---|---|---|")
for k in keys:
    a, am = cell("in-process", k)
    b, bm = cell("strata-storage-daemon", k)
    c, cm = cell("qemu-storage-daemon", k)
    r1 = "%.2f" % (bm / am) if am and bm else "-"
    r2 = "%.2f" % (bm / cm) if cm and bm else "-"
    print("| %s | %s | %s | %s | %s | %s |" % (k, a, b, c, r1, r2))
os.unlink(img)
PY
