#!/bin/sh
# The comparison set of issue 17, in one table: virtio-blk in the guest
# (bench/virtio-guest.sh) on a null-co disk and on a tmpfs raw file,
# each on a quiet host and with a CPU hog on one core, the same for AHCI
# on q35 (bench/ahci-guest.sh; AHCI=0 skips it), then strata-img
# against qemu-img (bench/qcow2-bench.sh): convert raw->qcow2 and
# qcow2->raw, and `bench` 4 KiB writes at depth 32 into an allocated and
# an empty qcow2, on tmpfs (the tools, not the host disk), quiet and with
# the hog. Ratios are Strata/QEMU speed (IOPS ratio, or qemu time /
# strata time): above 1.0 Strata is faster.
#
# usage: bench/all.sh [runs] [seconds-per-workload]   (make bench)
# Env: SETS="null tmpfs" (backings), HOGS="0 1", AHCI=0 skips the AHCI
# rows, QCOW2=0 skips strata-img.
# Each script's own output goes to bench/out/all/.
set -eu
cd "$(dirname "$0")/.."
runs=${1:-5}
secs=${2:-2}
out=bench/out/all
mkdir -p "$out"
res=$out/results.tsv
: >"$res"
for img in ${SETS:-null tmpfs}; do
    for hog in ${HOGS:-0 1}; do
        label="$img$([ "$hog" = 1 ] && echo ', CPU hog' || true)"
        echo "== virtio-blk, $label" >&2
        IMG=$img HOG=$hog LABEL="$label" RESULTS="$res" \
            sh bench/virtio-guest.sh "$runs" "$secs" >"$out/virtio-$img-hog$hog.md" 2>"$out/virtio-$img-hog$hog.log"
    done
done
if [ "${AHCI:-1}" = 1 ]; then
    for img in ${SETS:-null tmpfs}; do
        for hog in ${HOGS:-0 1}; do
            label="AHCI: $img$([ "$hog" = 1 ] && echo ', CPU hog' || true)"
            echo "== $label" >&2
            IMG=$img HOG=$hog LABEL="$label" RESULTS="$res" \
                sh bench/ahci-guest.sh "$runs" "$secs" >"$out/ahci-$img-hog$hog.md" 2>"$out/ahci-$img-hog$hog.log" ||
                echo "bench/ahci-guest.sh failed under QEMU; see $out/ahci-$img-hog$hog.md" >&2
        done
    done
fi
qdir=/dev/shm/strata-qcow2-bench
if [ "${QCOW2:-1}" = 1 ]; then
    for hog in ${HOGS:-0 1}; do
        echo "== strata-img, tmpfs$([ "$hog" = 1 ] && echo ', CPU hog' || true)" >&2
        hogpid=
        if [ "$hog" = 1 ]; then
            taskset -c "$(($(nproc) - 1))" sh -c 'while :; do :; done' &
            hogpid=$!
        fi
        BENCH_DIR=$qdir REPEAT=$runs CASES='^(convert (raw->qcow2|qcow2->raw)|bench 4k write)' \
            bash bench/qcow2-bench.sh >"$out/qcow2-hog$hog.log" 2>&1 || true
        [ -n "$hogpid" ] && kill "$hogpid"
        cp "$qdir/summary.md" "$out/qcow2-hog$hog.md" 2>/dev/null || true
    done
    rm -rf "$qdir"
fi
echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), $runs alternating runs per VMM, median (min-max)"
grep -h '^# host disk' "$out"/virtio-*.md | head -1
echo
echo "| backing, load | workload | Strata | QEMU 7.2 | Strata/QEMU |"
echo "|---|---|---|---|---|"
awk -F'\t' '{ printf "| %s | %s | %s (%s-%s) IOPS | %s (%s-%s) IOPS | %.2f |\n", $1, $2, $3, $4, $5, $6, $7, $8, $3 / $6 }' "$res"
for hog in ${HOGS:-0 1}; do
    f=$out/qcow2-hog$hog.md
    [ -f "$f" ] && [ "${QCOW2:-1}" = 1 ] || continue
    # | case | qemu-img s | strata-img s | ratio | ...; the spread is in the log.
    label="tmpfs$([ "$hog" = 1 ] && echo ', CPU hog' || true)"
    grep -E '^\| (convert|bench)' "$f" |
        awk -F'|' -v l="$label" '{ gsub(/^ +| +$/, "", $2); printf "| %s | strata-img %s | %s s | %s s | %s |\n", l, $2, $4 + 0, $3 + 0, $5 + 0 }'
done
