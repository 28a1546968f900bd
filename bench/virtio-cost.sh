#!/bin/sh
# Per-request cost of Strata's virtio-blk path, counted rather than timed:
# one boot of images/virtio-bench under `perf stat` (software events and
# syscall tracepoints, which work on this host's VM where the hardware
# counters do not), divided by the requests the guest completed.
#
# usage: bench/virtio-cost.sh [seconds-per-workload]
# Env: STRATA=path (default target/release/strata), IMG=null or a raw file
#      (default /dev/shm/virtio-bench.img, a 1 GiB tmpfs file),
#      EXTRA="..." more strata arguments (e.g. an -object iothread).
set -eu
cd "$(dirname "$0")/.."
secs=${1:-2}
strata=${STRATA:-target/release/strata}
img=${IMG:-/dev/shm/virtio-bench.img}
if [ "$img" = null ]; then
    drive="driver=null-co,size=1073741824,read-zeroes=on,if=none,id=d0"
else
    [ -f "$img" ] || dd if=/dev/zero of="$img" bs=1M count=1024 status=none
    drive="file=$img,if=none,id=d0,format=raw,cache=none,aio=io_uring"
fi
out=$(mktemp)
perf stat -x, -o "$out.perf" \
    -e task-clock,context-switches,syscalls:sys_enter_io_uring_enter,syscalls:sys_enter_write,syscalls:sys_enter_read,syscalls:sys_enter_ioctl,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_futex \
    "$strata" -m 128 -nodefaults -serial stdio -kernel images/out/virtio-bench.elf \
    -append "secs=$secs ${ONLY:-}" -drive "$drive" -device "virtio-blk-pci,drive=d0${DEVOPT:-}" ${EXTRA:-} >"$out"
grep VBENCH "$out" | grep -v DONE
reqs=$(grep -o 'reqs=[0-9]*' "$out" | cut -d= -f2 | paste -sd+ | bc)
echo "requests: $reqs"
awk -F, -v reqs="$reqs" '$1 ~ /^[0-9.]+$/ { printf "%-40s %12s  per request %.3f\n", $3, $1, $1 / reqs }' "$out.perf"
rm -f "$out" "$out.perf"
