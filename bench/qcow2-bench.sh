#!/usr/bin/env bash
# qcow2: strata-img against qemu-img, same arguments, same files, in one run
# (issue 4's benchmark set). For each case it prints the median wall time
# and peak RSS of each tool and the ratios qemu/strata (>= 1.0: Strata is as
# fast or as small or better):
#   bench 4 KiB reads and writes, depth 32, -t none -i io_uring, on an
#     allocated image and on an empty one (writes that allocate clusters);
#   convert raw->qcow2, qcow2->raw, and -c (compressed);
#   check on a 100 GiB sparse qcow2 with 2 GiB allocated.
# Each case runs REPEAT times (default 3, alternating which tool goes
# first); peak RSS comes from GNU time (%M, KiB).
# Usage: bench/qcow2-bench.sh [--quick]   (env: STRATA_IMG, BENCH_DIR, COUNT, REPEAT,
#   CASES: an extended regex; only cases whose name matches run)
# BENCH_DIR on a tmpfs (e.g. /dev/shm/...) measures the tools rather than
# the host disk.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0
[[ "${1:-}" == "--quick" ]] && QUICK=1
STRATA_IMG=${STRATA_IMG:-target/release/strata-img}
if [[ ! -x "$STRATA_IMG" ]]; then
    cargo build --release -p cli --bin strata-img >&2
fi
command -v qemu-img >/dev/null || { echo "qemu-img not installed" >&2; exit 1; }
[[ -x /usr/bin/time ]] || { echo "GNU time (/usr/bin/time) not installed" >&2; exit 1; }

DIR=${BENCH_DIR:-bench/out/qcow2}
mkdir -p "$DIR"
COUNT=${COUNT:-100000}
REPEAT=${REPEAT:-3}
IMG_SIZE=1G        # the allocated image for bench
CONV_SIZE=2G       # convert source, with CONV_DATA_MB of data
CONV_DATA_MB=512
CHECK_DATA_MB=2048 # allocated in the 100 GiB image for check
if (( QUICK )); then COUNT=20000; IMG_SIZE=256M; CONV_SIZE=256M; CONV_DATA_MB=64; CHECK_DATA_MB=256; fi

ratio() { awk -v q="$1" -v s="$2" 'BEGIN { if (s > 0) printf "%.2f", q / s; else print "inf" }'; }
median() { printf '%s\n' "$@" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

# measure CMD...: "seconds peak_kib" (wall time from GNU time).
measure() {
    local tf t0 t1
    tf=$(mktemp)
    t0=$(date +%s.%N)
    /usr/bin/time -o "$tf" -f "%M" "$@" >/dev/null
    t1=$(date +%s.%N)
    echo "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }') $(tail -1 "$tf")"
    rm -f "$tf"
}

# "Run completed in X seconds." is more precise for bench: prefer it.
measure_bench() {
    local tf out t
    tf=$(mktemp)
    out=$(/usr/bin/time -o "$tf" -f "%M" "$@")
    t=$(sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p' <<<"$out")
    echo "$t $(tail -1 "$tf")"
    rm -f "$tf"
}

results=()
printf '%-46s %9s %9s %6s %10s %10s %6s\n' "case" "qemu s" "strata s" "t-rat" "qemu KiB" "strata KiB" "m-rat"

# run_case NAME PREP KIND ARGS...: PREP is run before every single run (to
# reset the target); KIND is "bench" or "cmd"; the tool name is
# substituted for @TOOL@ and the output name for @OUT@.
run_case() {
    local name=$1 prep=$2 kind=$3; shift 3
    [[ $name =~ ${CASES:-.} ]] || return 0
    local qt=() st=() qm=() sm=() i tool r t m
    for (( i = 0; i < REPEAT; i++ )); do
        local order=(qemu strata)
        (( i % 2 == 1 )) && order=(strata qemu)
        for who in "${order[@]}"; do
            if [[ $who == qemu ]]; then tool=qemu-img; else tool=$STRATA_IMG; fi
            local args=()
            for a in "$@"; do
                a=${a//@OUT@/$DIR/out-$who}
                args+=("$a")
            done
            eval "$prep"
            sync
            if [[ $kind == bench ]]; then
                r=$(measure_bench "$tool" "${args[@]}")
            else
                r=$(measure "$tool" "${args[@]}")
            fi
            read -r t m <<<"$r"
            if [[ $who == qemu ]]; then qt+=("$t"); qm+=("$m"); else st+=("$t"); sm+=("$m"); fi
        done
    done
    local q s qk sk
    q=$(median "${qt[@]}"); s=$(median "${st[@]}")
    qk=$(median "${qm[@]}"); sk=$(median "${sm[@]}")
    printf '%-46s %9s %9s %6s %10s %10s %6s   (runs: qemu %s / strata %s)\n' \
        "$name" "$q" "$s" "$(ratio "$q" "$s")" "$qk" "$sk" "$(ratio "$qk" "$sk")" "${qt[*]}" "${st[*]}"
    results+=("$name|$q|$s|$(ratio "$q" "$s")|$qk|$sk|$(ratio "$qk" "$sk")")
}

# --- bench on an allocated image and on an empty one --------------------
ALLOC="$DIR/alloc-$IMG_SIZE.qcow2"
if [[ "bench 4k write" =~ ${CASES:-.} && ! -f "$ALLOC" ]]; then
    qemu-img create -q -f qcow2 -o preallocation=full "$ALLOC" "$IMG_SIZE"
fi
EMPTY="$DIR/empty.qcow2"
B="-f qcow2 -c $COUNT -d 32 -s 4k -t none -i io_uring"
# shellcheck disable=SC2086
run_case "bench 4k read d32 none io_uring, allocated" ":" bench bench $B "$ALLOC"
# shellcheck disable=SC2086
run_case "bench 4k write d32 none io_uring, allocated" ":" bench bench $B -w "$ALLOC"
# shellcheck disable=SC2086
run_case "bench 4k write d32 none io_uring, empty" \
    "rm -f '$EMPTY'; qemu-img create -q -f qcow2 '$EMPTY' '$IMG_SIZE'" bench bench $B -w "$EMPTY"
# shellcheck disable=SC2086
run_case "bench 4k read d32 none io_uring, empty" \
    "rm -f '$EMPTY'; qemu-img create -q -f qcow2 '$EMPTY' '$IMG_SIZE'" bench bench $B "$EMPTY"

# --- convert ---------------------------------------------------------------
SRC="$DIR/conv-src-$CONV_SIZE-$CONV_DATA_MB.raw"
if [[ "convert raw->qcow2" =~ ${CASES:-.} || "convert qcow2->raw" =~ ${CASES:-.} ]] && [[ ! -f "$SRC" ]]; then
    qemu-img create -q -f raw "$SRC" "$CONV_SIZE"
    # Data in 16 runs: half random, half a compressible text pattern.
    runs=16; per=$(( CONV_DATA_MB / runs )); gap=$(( $(numfmt --from=iec "$CONV_SIZE") / 1048576 / runs ))
    for i in $(seq 0 $(( runs - 1 ))); do
        if (( i % 2 )); then
            dd if=/dev/urandom of="$SRC" bs=1M count=$per seek=$(( i * gap )) conv=notrunc status=none
        else
            (set +o pipefail; yes "strata qcow2 benchmark line $i" | head -c $(( per * 1048576 ))) |
                dd of="$SRC" bs=1M seek=$(( i * gap )) conv=notrunc iflag=fullblock status=none
        fi
    done
fi
SRCQ="$DIR/conv-src-$CONV_SIZE-$CONV_DATA_MB.qcow2"
if [[ -f "$SRC" ]]; then
[[ -f "$SRCQ" ]] || qemu-img convert -f raw -O qcow2 "$SRC" "$SRCQ"
run_case "convert raw->qcow2 $CONV_SIZE (${CONV_DATA_MB}M data)" "rm -f $DIR/out-*" cmd \
    convert -f raw -O qcow2 "$SRC" @OUT@
run_case "convert qcow2->raw $CONV_SIZE (${CONV_DATA_MB}M data)" "rm -f $DIR/out-*" cmd \
    convert -f qcow2 -O raw "$SRCQ" @OUT@
run_case "convert -c raw->qcow2 $CONV_SIZE (${CONV_DATA_MB}M data)" "rm -f $DIR/out-*" cmd \
    convert -c -f raw -O qcow2 "$SRC" @OUT@
# The outputs must be right.
for t in "raw->qcow2:-O qcow2" "-c:-c -O qcow2"; do
    rm -f "$DIR/out-check"
    # shellcheck disable=SC2086
    "$STRATA_IMG" convert -f raw ${t#*:} "$SRC" "$DIR/out-check"
    qemu-img compare -q -f raw "$SRC" "$DIR/out-check" || { echo "strata-img convert ${t%%:*} differs!" >&2; exit 1; }
    qemu-img check -q "$DIR/out-check" || { echo "strata-img convert ${t%%:*}: qemu-img check fails!" >&2; exit 1; }
done
rm -f "$DIR"/out-*
fi

# --- check on a 100 GiB sparse image with 2 GiB allocated -------------------
BIG="$DIR/check-100g-$CHECK_DATA_MB.qcow2"
if [[ "check 100G" =~ ${CASES:-.} && ! -f "$BIG" ]]; then
    qemu-img create -q -f qcow2 "$BIG" 100G
    cmds=()
    n=32; per=$(( CHECK_DATA_MB / n ))
    for i in $(seq 0 $(( n - 1 ))); do
        cmds+=(-c "write -P $(( i % 250 + 1 )) $(( i * 3 + 1 ))G ${per}M")
    done
    qemu-io -f qcow2 "${cmds[@]}" "$BIG" >/dev/null
fi
[[ -f "$BIG" ]] && run_case "check 100G qcow2, ${CHECK_DATA_MB}M allocated" ":" cmd check -f qcow2 "$BIG"

{
    echo "| case | qemu-img (s) | strata-img (s) | time ratio qemu/strata | qemu-img peak RSS (KiB) | strata-img peak RSS (KiB) | RSS ratio qemu/strata |"
    echo "|---|---|---|---|---|---|---|"
    for line in "${results[@]}"; do
        IFS='|' read -r n q s r qk sk rk <<<"$line"
        echo "| $n | $q | $s | $r | $qk | $sk | $rk |"
    done
} > "$DIR/summary.md"
echo "summary written to $DIR/summary.md"
