#!/usr/bin/env bash
# strata-img bench / convert against qemu-img, same arguments, same files.
# Prints the time of each and the ratio qemu/strata (>= 1.0: Strata is as
# fast or faster). Issue 3's benchmark set:
#   raw, 4 KiB, depth 32, -t none, -i io_uring and -i threads, reads and
#   writes; 1 MiB sequential reads; convert raw->raw of a 4 GiB file holding
#   1 GiB of data.
# Each case runs REPEAT times (default 3, alternating which tool goes
# first) and the median is reported: the virtual disk here is noisy.
# Usage: bench/img-bench.sh [--quick]   (env: STRATA_IMG, BENCH_DIR, COUNT, REPEAT)
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0
[[ "${1:-}" == "--quick" ]] && QUICK=1
STRATA_IMG=${STRATA_IMG:-target/release/strata-img}
if [[ ! -x "$STRATA_IMG" ]]; then
    cargo build --release -p cli --bin strata-img >&2
fi
command -v qemu-img >/dev/null || { echo "qemu-img not installed" >&2; exit 1; }

DIR=${BENCH_DIR:-bench/out}
mkdir -p "$DIR"
IMG="$DIR/bench.img"
COUNT=${COUNT:-200000}
SIZE=4G
DATA_GB=1
if (( QUICK )); then COUNT=20000; SIZE=512M; DATA_GB=0; fi

# A fully allocated image, so reads hit the device and not holes.
if [[ ! -f "$IMG" ]] || [[ $(stat -c %s "$IMG") -ne $(numfmt --from=iec "$SIZE") ]]; then
    rm -f "$IMG"
    qemu-img create -q -f raw -o preallocation=full "$IMG" "$SIZE"
fi

# "Run completed in X seconds." -> X
run_time() { "$@" | sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p'; }

ratio() { awk -v q="$1" -v s="$2" 'BEGIN { if (s > 0) printf "%.2f", q / s; else print "inf" }'; }

printf '%-44s %10s %10s %8s\n' "case" "qemu-img" "strata" "ratio"
results=()
# Median of REPEAT runs; the order alternates so neither tool always runs
# on a warmer device.
REPEAT=${REPEAT:-3}
median() { printf '%s\n' "$@" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
bench_case() {
    local name=$1; shift
    local qs=() ss=() i
    for (( i = 0; i < REPEAT; i++ )); do
        if (( i % 2 == 0 )); then
            qs+=("$(run_time qemu-img bench "$@" "$IMG")")
            ss+=("$(run_time "$STRATA_IMG" bench "$@" "$IMG")")
        else
            ss+=("$(run_time "$STRATA_IMG" bench "$@" "$IMG")")
            qs+=("$(run_time qemu-img bench "$@" "$IMG")")
        fi
    done
    local q s r
    q=$(median "${qs[@]}")
    s=$(median "${ss[@]}")
    r=$(ratio "$q" "$s")
    printf '%-44s %9ss %9ss %8s   (runs: qemu %s / strata %s)\n' "$name" "$q" "$s" "$r" "${qs[*]}" "${ss[*]}"
    results+=("$name|$q|$s|$r")
}

for aio in io_uring threads; do
    bench_case "4k randread-ish d32 -t none -i $aio" -f raw -c "$COUNT" -d 32 -s 4k -t none -i "$aio"
    bench_case "4k write d32 -t none -i $aio" -f raw -w -c "$COUNT" -d 32 -s 4k -t none -i "$aio"
done
SEQ=$(( COUNT / 64 > 100 ? COUNT / 64 : 100 ))
bench_case "1M seq read d32 -t none -i io_uring" -f raw -c "$SEQ" -d 32 -s 1M -t none -i io_uring

# convert: a sparse 4 GiB source with 1 GiB of data spread in 64 MiB runs.
SRC="$DIR/conv-src.img"
if [[ ! -f "$SRC" ]] || [[ $(stat -c %s "$SRC") -ne $(numfmt --from=iec "$SIZE") ]]; then
    rm -f "$SRC"
    qemu-img create -q -f raw "$SRC" "$SIZE"
    if (( DATA_GB > 0 )); then
        for i in $(seq 0 15); do
            dd if=/dev/urandom of="$SRC" bs=1M count=64 seek=$(( i * 256 )) conv=notrunc status=none
        done
    else
        dd if=/dev/urandom of="$SRC" bs=1M count=64 seek=64 conv=notrunc status=none
    fi
fi
time_cmd() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N); awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }'; }
qs=(); ss=()
for (( i = 0; i < REPEAT; i++ )); do
    rm -f "$DIR/q.img" "$DIR/s.img"; sync
    if (( i % 2 == 0 )); then
        qs+=("$(time_cmd qemu-img convert -f raw -O raw "$SRC" "$DIR/q.img")")
        rm -f "$DIR/q.img"; sync
        ss+=("$(time_cmd "$STRATA_IMG" convert -f raw -O raw "$SRC" "$DIR/s.img")")
    else
        ss+=("$(time_cmd "$STRATA_IMG" convert -f raw -O raw "$SRC" "$DIR/s.img")")
        rm -f "$DIR/s.img"; sync
        qs+=("$(time_cmd qemu-img convert -f raw -O raw "$SRC" "$DIR/q.img")")
    fi
done
q=$(median "${qs[@]}"); s=$(median "${ss[@]}")
r=$(ratio "$q" "$s")
printf '%-44s %9ss %9ss %8s   (runs: qemu %s / strata %s)\n' "convert raw->raw $SIZE" "$q" "$s" "$r" "${qs[*]}" "${ss[*]}"
results+=("convert raw->raw $SIZE|$q|$s|$r")
rm -f "$DIR/q.img" "$DIR/s.img"
"$STRATA_IMG" convert -f raw -O raw "$SRC" "$DIR/s.img"
qemu-img compare -q -f raw -F raw "$SRC" "$DIR/s.img" || { echo "strata-img convert output differs from the source!" >&2; exit 1; }
rm -f "$DIR/s.img"

# Machine-readable summary for BENCHMARKS.md.
{
    echo "| case | qemu-img (s) | strata-img (s) | ratio qemu/strata |"
    echo "|---|---|---|---|"
    for line in "${results[@]}"; do
        IFS='|' read -r n q s r <<<"$line"
        echo "| $n | $q | $s | $r |"
    done
} > "$DIR/summary.md"
echo "summary written to $DIR/summary.md"
