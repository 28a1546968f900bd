#!/bin/sh
# The project's Linux test guest (images/linux-kernel's vmlinux, PVH direct
# boot, -m 64) with one disk at a time, as in the rows of the shared guest
# README's QEMU table: wall seconds from launch to GUEST-DONE on COM1 and the guest's
# own uptime at that point, with and without `quiet`. The disk is 16 MiB
# with an MBR partition, like the README's; the guest's /init
# (images/linux-init) reads 8 sectors of it before GUEST-DONE.
#
# Usage: bench/linux-lane.sh [runs]    (default 1; with more, the median)
# STRATA=path picks the binary (default target/debug/strata, which the
# tests build; the VMM's own share of a boot is well under a second).
set -eu
cd "$(dirname "$0")/.."
runs=${1:-1}
sh images/build.sh
strata=${STRATA:-target/debug/strata}
[ -x "$strata" ] || cargo build --bin strata >&2
guest=${GUEST:-$(images/linux-kernel/build.sh)}
python3 - "$runs" "$strata" "$guest/vmlinux" images/out/linux-lane.cpio <<'PY'
import os, re, statistics, struct, subprocess, sys, tempfile, time
runs, strata, kernel, initrd = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
tmp = tempfile.mkdtemp(prefix="linux-lane-")
disk = os.path.join(tmp, "disk.img")
cd = os.path.join(tmp, "cd.iso")
with open(disk, "wb") as f:
    # MBR: one Linux partition from LBA 2048 to the end.
    mbr = bytearray(512)
    mbr[446:462] = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", 2048, 32768 - 2048)
    mbr[510:512] = b"\x55\xaa"
    f.write(mbr)
    f.truncate(16 << 20)
with open(cd, "wb") as f:
    f.truncate(1 << 20)
cmdline = ("console=ttyS0 lpj=1000000 tsc=reliable no_timer_check "
           "clearcpuid=xsave,smap,fsgsbase,rdrand,rdseed,popcnt,invpcid,pcid,rdpid,erms,fsrm "
           "rodata=off")
raw = lambda p, rest: "file=%s,format=raw,%s" % (p, rest)
cases = [
    ("none", [], ""),
    ("IDE disk", ["-drive", raw(disk, "if=ide,index=0,media=disk")], "check=sda:8"),
    ("IDE CD-ROM", ["-drive", raw(cd, "if=ide,index=2,media=cdrom")], "check=sr0:8"),
    ("virtio-blk (transitional)", ["-drive", raw(disk, "if=none,id=d"),
                                   "-device", "virtio-blk-pci,drive=d"], "check=vda:8"),
    ("virtio-blk (disable-legacy=on)", ["-drive", raw(disk, "if=none,id=d"),
                                        "-device", "virtio-blk-pci,drive=d,disable-legacy=on"],
     "check=vda:8"),
]

def once(args, append):
    log = os.path.join(tmp, "serial.log")
    if os.path.exists(log):
        os.unlink(log)
    cmd = [strata, "-m", "64", "-nodefaults", "-serial", "file:" + log,
           "-kernel", kernel, "-initrd", initrd, "-append", append] + args
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    wall = guest = None
    while time.monotonic() - t0 < 150:
        try:
            text = open(log, "rb").read().decode("latin-1")
        except FileNotFoundError:
            text = ""
        m = re.search(r"GUEST-DONE ([0-9.]+)", text)
        if m:
            wall, guest = time.monotonic() - t0, float(m.group(1))
            break
        if p.poll() is not None:
            break
        time.sleep(0.05)
    p.kill()
    p.wait()
    if "GUEST-ERR" in text or "GUEST-SUM" not in text and "check=" in append:
        sys.exit("guest could not read its disk:\n" + text)
    if wall is None:
        sys.exit("no GUEST-DONE within 150 s:\n" + text)
    return wall, guest

print("| device | Strata, quiet: wall (guest) | Strata, no quiet: wall (guest) |")
print("|---|---|---|")
for name, args, checks in cases:
    cols = []
    for quiet in (" quiet", ""):
        res = [once(args, cmdline + quiet + " " + checks) for _ in range(runs)]
        w = statistics.median(r[0] for r in res)
        g = statistics.median(r[1] for r in res)
        cols.append("%.1f s (%.1f)" % (w, g))
    print("| %s | %s | %s |" % (name, cols[0], cols[1]), flush=True)
PY
