#!/bin/sh
# The vhost-user-blk data path with a real Linux virtio driver:
# qemu-storage-daemon against strata-storage-daemon, each exporting the same
# image as `--export type=vhost-user-blk` to QEMU 7.2 (the frontend).
#
# The guest is the project's Linux test guest (images/linux-kernel's
# bzImage, images/linux-init's /init) under QEMU with TCG, as in
# cli/tests/vhost_user_tcg.rs: TCG needs no KVM and boots it in about a
# second here. /init's `iops=` runs the workload: O_DIRECT requests at
# random aligned offsets, one at a time (queue depth 1: /init has no libc,
# no io_uring), writes then reads, timed by the guest's monotonic clock;
# it prints "GUEST-IOPS <dev> <write|read> <KiB> <count> <us> <IOPS>".
# Under TCG the guest's own CPU cost per request is large and the same for
# both daemons, so the IOPS ratio understates the difference between the
# backends; the daemon's CPU time per request (utime+stime from
# /proc/<pid>/stat just before it is stopped, boot included) shows it
# directly.
#
# usage: bench/vhost-user.sh [runs] [count-4k] [count-64k]
#   runs: runs per daemon, alternating which goes first (default 5)
#   count-4k, count-64k: requests per phase of the 4 KiB and 64 KiB
#     workloads (defaults 40000 and 8000: about 10 s per run here)
# Env: QEMU=/path/to/qemu-system-x86_64 (default: bench/qemu-local.sh),
#      QSD=/path/to/qemu-storage-daemon (default: the one on PATH),
#      STRATA_SD=/path/to/strata-storage-daemon (default:
#        target/release/strata-storage-daemon, built when the workspace
#        has it; when there is none, only qemu-storage-daemon runs),
#      IMG=tmpfs (default: a 256 MiB raw file in /dev/shm) or IMG=null
#        (a null-co node, read-zeroes=on: no host I/O at all), or a path
#        to a raw file of at least 64 MiB,
#      FILE_OPTS=",aio=io_uring,cache.direct=on" and the like: appended to
#        the file node of both daemons, so they open the image alike,
#      QUEUES=n: num-queues of the export and the device (default 1).
# Logs of each run go to bench/out/vhost-user/.
set -eu
cd "$(dirname "$0")/.."
runs=${1:-5}
n4=${2:-40000}
n64=${3:-8000}
sh images/build.sh >/dev/null
kernel=$(sh images/linux-kernel/build.sh)/bzImage
initrd=images/out/linux-lane.cpio
if [ -n "${QEMU:-}" ]; then
    qemu=$QEMU
else
    st=0
    qemu=$(sh bench/qemu-local.sh) || st=$?
    [ "$st" = 0 ] || { echo "bench/vhost-user.sh: no QEMU 7.2 (bench/qemu-local.sh exit $st)" >&2; exit 1; }
fi
qsd=${QSD:-$(command -v qemu-storage-daemon)}
ssd=${STRATA_SD:-target/release/strata-storage-daemon}
if [ -z "${STRATA_SD:-}" ]; then
    cargo build --release --bin strata-storage-daemon >/dev/null 2>&1 || true
fi
if [ ! -x "$ssd" ]; then
    echo "# $ssd does not exist (yet): only qemu-storage-daemon runs" >&2
    ssd=
fi
img=${IMG:-tmpfs}
[ "$img" = tmpfs ] && img=/dev/shm/strata-vhost-user-bench.img
if [ "$img" != null ] && [ ! -f "$img" ]; then
    # Written in full, so no read lands in a hole.
    dd if=/dev/zero of="$img" bs=1M count=256 status=none
fi
mkdir -p bench/out/vhost-user
echo "# $(date -u '+%Y-%m-%d %H:%M UTC'); load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$runs" "$n4" "$n64" "$qemu" "$qsd" "$ssd" "$img" "$kernel" "$initrd" <<'PY'
import os, re, statistics, subprocess, sys, time

runs, n4, n64 = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
qemu, qsd, ssd, img, kernel, initrd = sys.argv[4:10]
queues = os.environ.get("QUEUES", "1")
file_opts = os.environ.get("FILE_OPTS", "")
out = "bench/out/vhost-user"
sock = f"/tmp/strata-vhost-user-bench-{os.getpid()}.sock"
daemons = {"qemu-storage-daemon": qsd}
if ssd:
    daemons["strata-storage-daemon"] = ssd

if img == "null":
    nodes = ["--blockdev", "driver=null-co,node-name=disk0,size=268435456,read-zeroes=on"]
else:
    nodes = ["--blockdev", f"driver=file,node-name=file0,filename={img}{file_opts}",
             "--blockdev", "driver=raw,node-name=disk0,file=file0"]
export = ["--export", "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
          f"addr.path={sock},writable=on,num-queues={queues}"]
append = f"console=ttyS0 quiet iops=vda:4:{n4} iops=vda:64:{n64}"
vm = [qemu, "-accel", "tcg", "-bios", "/usr/share/seabios/bios-256k.bin",
      "-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio",
      # vhost-user maps all of guest RAM in the backend: shared memfd.
      "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
      "-machine", "pc,memory-backend=mem", "-m", "256M",
      "-chardev", f"socket,id=vu,path={sock}",
      "-device", f"vhost-user-blk-pci,chardev=vu,num-queues={queues}",
      "-kernel", kernel, "-initrd", initrd, "-append", append]
line = re.compile(r"GUEST-IOPS vda (write|read) (\d+) (\d+) (\d+) (\d+)")
tick = os.sysconf("SC_CLK_TCK")

def cpu_s(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tick  # utime, stime

def one(name, prog, r):
    try:
        os.unlink(sock)
    except FileNotFoundError:
        pass
    log = open(f"{out}/{name}-{r}.daemon.log", "w")
    d = subprocess.Popen([prog] + nodes + export, stdin=subprocess.DEVNULL,
                         stdout=log, stderr=subprocess.STDOUT)
    t = time.monotonic()
    while not os.path.exists(sock):
        if d.poll() is not None or time.monotonic() - t > 10:
            d.kill()
            sys.exit(f"{name} run {r}: never listened; see {out}/{name}-{r}.daemon.log")
        time.sleep(0.01)
    t0 = time.monotonic()
    try:
        p = subprocess.run(vm, capture_output=True, text=True, timeout=300)
        con = p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        con = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    wall = time.monotonic() - t0
    cpu = cpu_s(d.pid)
    d.terminate()
    d.wait(timeout=10)
    with open(f"{out}/{name}-{r}.log", "w") as f:
        f.write(con)
    if "GUEST-DONE" not in con or "GUEST-ERR" in con:
        sys.exit(f"{name} run {r}: the guest failed; see {out}/{name}-{r}.log")
    res = {}
    for m in line.finditer(con):
        op, kib, count, us, iops = m.group(1), *map(int, m.groups()[1:])
        res[f"{op}-{kib}k"] = (iops, count)
    reqs = sum(c for _, c in res.values())
    print(f"run {r} {name}: {wall:.1f} s, daemon CPU {cpu:.2f} s", file=sys.stderr)
    return res, cpu * 1e6 / reqs

results = {k: [] for k in daemons}
for r in range(runs):
    names = list(daemons)
    k = r % len(names)
    for name in names[k:] + names[:k]:
        results[name].append(one(name, daemons[name], r))

qv = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
print(f"# {runs} runs per daemon, median (min-max); frontend {qv} with TCG; "
      f"image {img}{file_opts}; num-queues={queues}")
for n, prog in daemons.items():
    print(f"# {n}: {prog}")
print(f"# load average after: {' '.join(open('/proc/loadavg').read().split()[:3])}")

def cell(v, fmt="{:.0f}"):
    return f"{fmt.format(statistics.median(v))} ({fmt.format(min(v))}-{fmt.format(max(v))})"

workloads = list(results["qemu-storage-daemon"][0][0])
names = list(daemons)
head = " | ".join(names)
print(f"| workload (QD1) | {head} |" + (" strata/qemu |" if ssd else ""))
print("|---|" + "---|" * len(names) + ("---|" if ssd else ""))
for w in workloads:
    cols = [[x[0][w][0] for x in results[n]] for n in names]
    ratio = (f" {statistics.median(cols[1]) / statistics.median(cols[0]):.2f} |" if ssd else "")
    print(f"| {w} IOPS | " + " | ".join(cell(c) for c in cols) + " |" + ratio)
cols = [[x[1] for x in results[n]] for n in names]
# For CPU a ratio qemu/strata, so that above 1.0 Strata is better here too.
ratio = (f" {statistics.median(cols[0]) / statistics.median(cols[1]):.2f} (qemu/strata) |" if ssd else "")
print("| daemon CPU per request (us) | " + " | ".join(cell(c, "{:.1f}") for c in cols) + " |" + ratio)
PY
