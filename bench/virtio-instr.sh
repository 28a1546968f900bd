#!/bin/sh
# Instructions per virtio-blk request on Strata's side, counted by
# callgrind rather than timed, so the numbers repeat on a loaded host
# (wall-clock runs: bench/virtio-guest.sh).
#
# Each workload of images/virtio-bench runs in its own boot, with a fixed
# number of requests ("reqs=N" on the guest's command line), under
# `valgrind --tool=callgrind --separate-threads=yes`; the loop thread
# that runs the device (the main loop's, "iothread-main-loop", unless
# EXTRA names an iothread) is the thread with the most instructions after
# the main thread, which only sets up. Printed per workload: instructions
# of that thread per request, and of the whole process per request.
# Both include fixed costs (start-up, the loop's set-up), which a larger
# N dilutes; compare runs with the same N. kicks/req is the guest's count
# of notifications per request, which is the loop's passes per request
# with polling off: at depth 1 always 1, at depth 32 it depends on how
# the (native-speed) guest and the (slowed) device interleave and varies
# from run to run, and the per-pass costs with it; compare depth-32 rows
# with similar kicks/req.
#
# Polling is off by default (POLL=0, `-object main-loop,poll-max-ns=0`):
# under callgrind a spinning loop counts however long it spun, which is
# time, not work. POLL=32768 measures with QEMU's default polling time.
#
# usage: bench/virtio-instr.sh [requests-per-workload]   (default 4000)
# Env: STRATA=path (default target/release/strata), IMG=null (default,
#      a null-co disk: no host I/O, only Strata's own cost) or tmpfs (a
#      1 GiB file in /dev/shm, cache=none,aio=io_uring) or a raw file,
#      ONLY="randread-4k-qd1 ..." workloads to run (default: all five),
#      KEEP=dir: keep the callgrind files there (for callgrind_annotate).
set -eu
cd "$(dirname "$0")/.."
n=${1:-4000}
strata=${STRATA:-target/release/strata}
img=${IMG:-null}
[ "$img" = tmpfs ] && img=/dev/shm/virtio-bench.img
sh images/build.sh
if [ "$img" = null ]; then
    drive="driver=null-co,size=1073741824,read-zeroes=on,if=none,id=d0"
else
    [ -f "$img" ] || dd if=/dev/zero of="$img" bs=1M count=1024 status=none
    drive="file=$img,if=none,id=d0,format=raw,cache=none,aio=io_uring"
fi
loads=${ONLY:-randread-4k-qd1 randread-4k-qd32 randwrite-4k-qd1 randwrite-4k-qd32 seqread-64k-qd8}
dir=${KEEP:-$(mktemp -d)}
mkdir -p "$dir"
echo "# $(git rev-parse --short HEAD 2>/dev/null || echo ?) $strata, $img, $n requests per workload, poll-max-ns=${POLL:-0}"
printf '%-20s %14s %14s %10s\n' workload loop-thread/req process/req kicks/req
for w in $loads; do
    out="$dir/$w.cg"
    rm -f "$out" "$out"-*
    # shellcheck disable=SC2086
    valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$out" \
        "$strata" -m 128 -nodefaults -serial stdio -kernel images/out/virtio-bench.elf \
        -append "secs=600 reqs=$n only=$w" -drive "$drive" -device virtio-blk-pci,drive=d0 \
        -object "main-loop,id=ml,poll-max-ns=${POLL:-0}" ${EXTRA:-} >"$dir/$w.log" 2>"$dir/$w.valgrind"
    reqs=$(grep -o 'reqs=[0-9]*' "$dir/$w.log" | cut -d= -f2)
    kicks=$(grep -o 'kicks=[0-9]*' "$dir/$w.log" | cut -d= -f2)
    [ -n "$reqs" ] || { echo "$w: no VBENCH line, see $dir/$w.log" >&2; exit 1; }
    # "summary: N" per thread file; thread 1 (the first file) is main.
    totals=$(for f in "$out"-*; do sed -n 's/^summary: //p' "$f"; done)
    loop=$(echo "$totals" | tail -n +2 | sort -n | tail -1)
    all=$(echo "$totals" | paste -sd+ | bc)
    printf '%-20s %14d %14d %10s\n' "$w" $((loop / reqs)) $((all / reqs)) "$(echo "scale=3; $kicks / $reqs" | bc)"
done
[ -n "${KEEP:-}" ] || rm -rf "$dir"
