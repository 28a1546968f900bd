#!/bin/sh
# AHCI end to end under KVM, Strata side by side with QEMU 7.2: the AHCI
# counterpart of bench/virtio-guest.sh, with the same workloads.
#
# The guest is images/ahci-bench (a polled AHCI driver that measures in
# ring 3 and prints "ABENCH <workload> iops=... lat_us=..."; READ/WRITE
# DMA EXT at depth 1, NCQ above when the HBA and the disk offer it). The
# same ELF boots under both VMMs with -kernel on `-M q35`, the disk on the
# built-in AHCI (00:1f.2, port 0):
#   -drive file=IMG,format=raw,if=none,id=d0,cache=none,aio=io_uring
#   -device ide-hd,drive=d0,bus=ide.0
# directly under Strata, through SeaBIOS + the multiboot option ROM under
# QEMU. The disk is a 1 GiB raw file, written in full once (so reads hit
# allocated blocks, not holes): the same file as virtio-guest.sh's.
#
# usage: bench/ahci-guest.sh [runs] [seconds-per-workload]
#   runs: runs per VMM, alternating Strata/QEMU (default 3)
# Env: QEMU=/path/to/qemu-system-x86_64 (default: bench/qemu-local.sh),
#      STRATA_BEFORE=/path/to/an/older/strata: runs it too, in the same
#      rotation, and prints its table as well,
#      IMG=/path/to/raw (default: bench/out/virtio-bench.img), IMG=tmpfs
#      for a 1 GiB file in /dev/shm, or IMG=null for a null-co disk (1 GiB
#      of zeroes, no host I/O): each VMM's own cost per request.
#      HOG=1: a busy loop pinned to the last host CPU runs during the runs.
#      NCQ=0: the guest does not use NCQ (every workload at depth 1);
#      NCQ=1: it uses NCQ when the HBA offers it (CAP.SNCQ) even if the
#      disk does not say so in IDENTIFY word 76.
#      RESULTS=file: also append the rows there, tab-separated
#      (label workload strata-median min max qemu-median min max), for
#      bench/all.sh; LABEL names the row set.
# A run that fails (no ABENCH-DONE within its timeout, or a workload that
# reports error=...) does not stop the others: the table says which VMM
# failed where, and the exit status is 1 only if QEMU, the reference,
# failed. Logs of each run go to bench/out/ahci-guest/.
set -eu
cd "$(dirname "$0")/.."
runs=${1:-3}
secs=${2:-3}
cargo build --release --bin strata >/dev/null
sh images/build.sh
qemu=${QEMU:-$(sh bench/qemu-local.sh)}
img=${IMG:-bench/out/virtio-bench.img}
[ "$img" = tmpfs ] && img=/dev/shm/virtio-bench.img
mkdir -p bench/out/ahci-guest
if [ "$img" != null ] && { [ ! -f "$img" ] || [ "$(stat -c %s "$img")" -ne 1073741824 ]; }; then
    echo "writing $img (1 GiB of zeros, so every block is allocated)" >&2
    dd if=/dev/zero of="$img.tmp" bs=1M count=1024 conv=fsync status=none
    mv "$img.tmp" "$img"
fi
# The host disk's speed of the day (PLATFORM.md: it varies week to week).
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
kernel = "images/out/ahci-bench.elf"
drive = (f"driver=null-co,size=1073741824,read-zeroes=on,if=none,id=d0" if img == "null"
         else f"file={img},format=raw,if=none,id=d0,cache=none,aio=io_uring")
append = f"secs={secs}" + (f" ncq={os.environ['NCQ']}" if os.environ.get("NCQ") in ("0", "1") else "")
common = ["-M", "q35", "-m", "128", "-nodefaults", "-serial", "stdio", "-kernel", kernel,
          "-append", append, "-drive", drive, "-device", "ide-hd,drive=d0,bus=ide.0"]
cmds = {
    "strata": ["target/release/strata"] + common,
    # QEMU needs SeaBIOS to run the multiboot option ROM; bios-256k.bin is
    # what its machines use.
    "qemu": [qemu, "-accel", "kvm", "-display", "none",
             "-bios", "/usr/share/seabios/bios-256k.bin"] + common,
}
if before:
    cmds["before"] = [before] + common
# Five workloads, each at most secs + 2 s (the guest's stall timeout) and
# its recovery, plus boot: a run that takes longer is stuck.
limit = 60 + 10 * secs
line = re.compile(r"ABENCH (\S+) iops=(\d+) lat_us=(\d+) reqs=(\d+) depth=(\d+) ncq=(\d) polls=(\d+) errors=(\d+)")
errline = re.compile(r"ABENCH (\S+) error=(\S+)")
results = {k: {} for k in cmds}  # vmm -> workload -> [(iops, lat, depth)]
failures = {k: {} for k in cmds}  # vmm -> workload -> [error, ...]
notes = []
order = []
for r in range(runs):
    # Alternate which VMM goes first, so drift in the host's disk or load
    # does not favour one side.
    names = list(cmds)
    k = r % len(names)
    for vmm in names[k:] + names[:k]:
        t0 = time.monotonic()
        p = subprocess.run(["timeout", "-k", "5", str(limit)] + cmds[vmm],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, errors="replace")
        out = p.stdout
        wall = time.monotonic() - t0
        log = f"bench/out/ahci-guest/{vmm}-{r}.log"
        with open(log, "w") as f:
            f.write(out)
        for m in re.finditer(r"ABENCH (\S+) (?:iops|error)=", out):
            if m.group(1) not in order:
                order.append(m.group(1))
        for m in line.finditer(out):
            w = m.group(1)
            iops, lat, reqs, depth, ncq, polls, errs = map(int, m.groups()[1:])
            if errs:
                failures[vmm].setdefault(w, []).append(f"{errs} short transfers")
                continue
            results[vmm].setdefault(w, []).append((iops, lat, depth))
        for m in errline.finditer(out):
            w = m.group(1)
            failures[vmm].setdefault(w, []).append(m.group(2))
        if "ABENCH-DONE" not in out:
            why = "timed out" if p.returncode in (124, 137) else f"exit {p.returncode}"
            tail = [l for l in out.splitlines() if l.startswith(("ABENCH-ERROR", "ABENCH-FAULT", "strata:", "qemu-system"))]
            notes.append(f"{vmm} run {r}: no ABENCH-DONE ({why}); {'; '.join(tail[-2:]) or 'see'} {log}")
        print(f"run {r} {vmm}: {wall:.1f} s", file=sys.stderr)

def med(v, i):
    return statistics.median(x[i] for x in v)

def cell(vmm, w):
    v = results[vmm].get(w, [])
    if not v:
        return "failed"
    return f"{med(v,0):.0f} ({min(x[0] for x in v)}-{max(x[0] for x in v)})"

def fails(vmm, w):
    f = failures[vmm].get(w, [])
    return ", ".join(sorted(set(f"{e} x{f.count(e)}" for e in f))) or "-"

qv = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
print(f"# {runs} runs per VMM, {secs} s per workload, median (min-max); {qv}")
print(f"# AHCI on -M q35 (ide-hd on ide.0), disk: {drive}")
print(f"# load average after: {open('/proc/loadavg').read().split()[:3]}")
label = os.environ.get("LABEL", img)
rows = []
for name in [n for n in cmds if n != "qemu"]:
    if name != "strata":
        print(f"# {name}: {before}")
    print(f"| workload | {name} IOPS | QEMU IOPS | {name}/QEMU | {name} lat (us) | QEMU lat (us) | depth {name}/QEMU | failed runs {name} | failed runs QEMU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for w in order:
        s, q = results[name].get(w, []), results["qemu"].get(w, [])
        ratio = f"{med(s,0)/med(q,0):.2f}" if s and q else "-"
        slat = f"{med(s,1):.0f}" if s else "-"
        qlat = f"{med(q,1):.0f}" if q else "-"
        depth = f"{int(med(s,2)) if s else '-'}/{int(med(q,2)) if q else '-'}"
        print(f"| {w} | {cell(name, w)} | {cell('qemu', w)} | {ratio} | {slat} | {qlat} | {depth} | "
              f"{fails(name, w)} | {fails('qemu', w)} |")
        if name == "strata" and s and q:
            wl = w if med(s,2) == med(q,2) else f"{w} (Strata at depth {int(med(s,2))})"
            rows.append(f"{label}\t{wl}\t{med(s,0):.0f}\t{min(x[0] for x in s)}\t{max(x[0] for x in s)}\t"
                        f"{med(q,0):.0f}\t{min(x[0] for x in q)}\t{max(x[0] for x in q)}\n")
for n in notes:
    print(f"# {n}")
if os.environ.get("RESULTS"):
    with open(os.environ["RESULTS"], "a") as f:
        f.writelines(rows)
sys.exit(1 if failures["qemu"] or any(n.startswith("qemu") for n in notes) else 0)
PY
