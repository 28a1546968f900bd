#!/bin/sh
# virtio-blk end to end under KVM, Strata side by side with QEMU 7.2
# (issue 7, benchmark part 2; issue 17).
#
# The guest is images/virtio-bench (a polled legacy virtio-blk driver that
# measures in ring 3 and prints "VBENCH <workload> iops=... lat_us=...").
# The same ELF boots under both VMMs with -kernel: directly under Strata,
# through SeaBIOS + the multiboot option ROM under QEMU. The disk is a
# 1 GiB raw file, written in full once (so reads hit allocated blocks, not
# holes), opened with cache=none,aio=io_uring by both.
#
# usage: bench/virtio-guest.sh [runs] [seconds-per-workload]
#   runs: runs per VMM, alternating Strata/QEMU (default 3)
# Env: QEMU=/path/to/qemu-system-x86_64 (default: bench/qemu-local.sh),
#      STRATA_BEFORE=/path/to/an/older/strata: runs it too, in the same
#      rotation, and prints its table as well (before/after comparisons),
#      IMG=/path/to/raw (default: bench/out/virtio-bench.img), IMG=tmpfs
#      for a 1 GiB file in /dev/shm (O_DIRECT works on tmpfs), or IMG=null
#      for a null-co disk (1 GiB of zeroes, no host I/O): what is left is
#      each VMM's own cost per request, without the host disk's noise.
#      HOG=1: a busy loop pinned to the last host CPU runs during the
#      runs (an unrelated CPU hog on one core).
#      IOTHREAD=1: both VMMs run the disk in `-object iothread,id=io0`
#      (QEMU then polls as its iothreads do; Strata polls either way).
#      RESULTS=file: also append the rows there, tab-separated
#      (label workload strata-median min max qemu-median min max), for
#      bench/all.sh; LABEL names the row set.
# Prints the date, the load average, a `dd` line for the host disk (4 KiB
# O_DIRECT reads of the disk image) and per workload the median and
# min-max of each VMM's IOPS.
# Logs of each run go to bench/out/virtio-guest/.
set -eu
cd "$(dirname "$0")/.."
runs=${1:-3}
secs=${2:-3}
cargo build --release --bin strata >/dev/null
sh images/build.sh
qemu=${QEMU:-$(sh bench/qemu-local.sh)}
img=${IMG:-bench/out/virtio-bench.img}
[ "$img" = tmpfs ] && img=/dev/shm/virtio-bench.img
mkdir -p bench/out/virtio-guest
if [ "$img" != null ] && { [ ! -f "$img" ] || [ "$(stat -c %s "$img")" -ne 1073741824 ]; }; then
    echo "writing $img (1 GiB of zeros, so every block is allocated)" >&2
    dd if=/dev/zero of="$img.tmp" bs=1M count=1024 conv=fsync status=none
    mv "$img.tmp" "$img"
fi
# The host disk's speed of the day (PLATFORM.md: it varies week to week).
# A 100 MiB file on the host disk (the default image when it exists).
disk=bench/out/virtio-bench.img
if [ ! -f "$disk" ]; then
    disk=bench/out/disk-probe.img
    [ -f "$disk" ] || dd if=/dev/zero of="$disk" bs=1M count=100 conv=fsync status=none
fi
ddline=$(dd if="$disk" of=/dev/null bs=4k count=20000 iflag=direct 2>&1 | tail -1)
echo "# host disk: dd 4 KiB O_DIRECT reads of $disk: $ddline"
echo "# $(date -u '+%Y-%m-%d %H:%M UTC'); load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
hog=
if [ "${HOG:-0}" = 1 ]; then
    cpu=$(($(nproc) - 1))
    taskset -c "$cpu" sh -c 'while :; do :; done' &
    hog=$!
    trap 'kill $hog 2>/dev/null' EXIT INT TERM
    echo "# CPU hog: a busy loop pinned to CPU $cpu during the runs"
fi
python3 - "$runs" "$secs" "$qemu" "$img" "${STRATA_BEFORE:-}" <<'PY'
import os, re, subprocess, sys, statistics, time

runs, secs, qemu, img = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
before = sys.argv[5]
kernel = "images/out/virtio-bench.elf"
drive = (f"driver=null-co,size=1073741824,read-zeroes=on,if=none,id=d0" if img == "null"
         else f"file={img},if=none,id=d0,format=raw,cache=none,aio=io_uring")
dev = "virtio-blk-pci,drive=d0"
iothread = []
if os.environ.get("IOTHREAD") == "1":
    iothread = ["-object", "iothread,id=io0"]
    dev += ",iothread=io0"
common = ["-m", "128", "-nodefaults", "-serial", "stdio", "-kernel", kernel,
          "-append", f"secs={secs}", "-drive", drive] + iothread + ["-device", dev]
cmds = {
    "strata": ["target/release/strata"] + common,
    # QEMU needs SeaBIOS to run the multiboot option ROM; bios-256k.bin is
    # what its `pc` machine uses.
    "qemu": [qemu, "-enable-kvm", "-display", "none",
             "-bios", "/usr/share/seabios/bios-256k.bin"] + common,
}
if before:
    cmds["before"] = [before] + common
line = re.compile(r"VBENCH (\S+) iops=(\d+) lat_us=(\d+) reqs=(\d+) kicks=(\d+) errors=(\d+)")
results = {k: {} for k in cmds}  # vmm -> workload -> [(iops, lat, kicks/req)]
order = []
for r in range(runs):
    # Alternate which VMM goes first, so drift in the host's disk or load
    # does not favour one side.
    names = list(cmds)
    k = r % len(names)
    for vmm in names[k:] + names[:k]:
        t0 = time.monotonic()
        try:
            p = subprocess.run(cmds[vmm], capture_output=True, text=True,
                               timeout=60 + 10 * secs)
            out = p.stdout
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        wall = time.monotonic() - t0
        with open(f"bench/out/virtio-guest/{vmm}-{r}.log", "w") as f:
            f.write(out)
        if "VBENCH-DONE" not in out:
            sys.exit(f"{vmm} run {r}: no VBENCH-DONE; see bench/out/virtio-guest/{vmm}-{r}.log")
        for m in line.finditer(out):
            w = m.group(1)
            if w not in order:
                order.append(w)
            iops, lat, reqs, kicks, errs = map(int, m.groups()[1:])
            if errs:
                sys.exit(f"{vmm} run {r}: {w}: {errs} requests failed")
            results[vmm].setdefault(w, []).append((iops, lat, kicks / max(reqs, 1)))
        print(f"run {r} {vmm}: {wall:.1f} s", file=sys.stderr)

def med(v, i):
    return statistics.median(x[i] for x in v)

qv = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
print(f"# {runs} runs per VMM, {secs} s per workload, median (min-max); {qv}")
print(f"# load average after: {open('/proc/loadavg').read().split()[:3]}")
label = os.environ.get("LABEL", img)
rows = []
for name in [n for n in cmds if n != "qemu"]:
    if name != "strata":
        print(f"# {name}: {before}")
    print(f"| workload | {name} IOPS | QEMU IOPS | {name}/QEMU | {name} lat (us) | QEMU lat (us) | kicks/req {name} | kicks/req QEMU |")
    print("|---|---|---|---|---|---|---|---|")
    for w in order:
        s, q = results[name][w], results["qemu"][w]
        smin, smax = min(x[0] for x in s), max(x[0] for x in s)
        qmin, qmax = min(x[0] for x in q), max(x[0] for x in q)
        print(f"| {w} | {med(s,0):.0f} ({smin}-{smax}) | {med(q,0):.0f} ({qmin}-{qmax}) | "
              f"{med(s,0)/med(q,0):.2f} | {med(s,1):.0f} | {med(q,1):.0f} | "
              f"{med(s,2):.3f} | {med(q,2):.3f} |")
        if name == "strata":
            rows.append(f"{label}\t{w}\t{med(s,0):.0f}\t{smin}\t{smax}\t{med(q,0):.0f}\t{qmin}\t{qmax}\n")
if os.environ.get("RESULTS"):
    with open(os.environ["RESULTS"], "a") as f:
        f.writelines(rows)
PY
