#!/usr/bin/env bash
# vpc (VHD), vdi, vhdx and vmdk: strata-img convert against qemu-img convert,
# same arguments, same files (issue 22's benchmark set): raw->FMT and
# FMT->raw for each FMT of FORMATS (default "vpc vdi vhdx vmdk") on a SIZE
# (default 4 GiB) raw image holding DATA_MB
# (default 1024) of random data in 16 runs. For each case it prints the
# median wall time of each tool, the spread (min-max) and the ratio
# qemu/strata (>= 1.0: Strata is as fast or faster). Each case runs
# REPEAT times (default 5), alternating which tool goes first; the
# outputs are checked with qemu-img compare (and check for vdi, vhdx
# and vmdk).
# Usage: bench/vpc-vdi-bench.sh [--quick]
#   (env: STRATA_IMG, BENCH_DIR (default /dev/shm/strata-vpcvdi: tmpfs, so
#   the tools are measured rather than the host disk), REPEAT, SIZE,
#   DATA_MB, FORMATS, CASES: an extended regex; only cases whose name
#   matches run)
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0
[[ "${1:-}" == "--quick" ]] && QUICK=1
STRATA_IMG=${STRATA_IMG:-target/release/strata-img}
if [[ ! -x "$STRATA_IMG" ]]; then
    cargo build --release -p cli --bin strata-img >&2
fi
command -v qemu-img >/dev/null || { echo "qemu-img not installed" >&2; exit 1; }

DIR=${BENCH_DIR:-/dev/shm/strata-vpcvdi}
mkdir -p "$DIR"
REPEAT=${REPEAT:-5}
SIZE=${SIZE:-4G}
DATA_MB=${DATA_MB:-1024}
if (( QUICK )); then REPEAT=3; SIZE=512M; DATA_MB=128; fi

ratio() { awk -v q="$1" -v s="$2" 'BEGIN { if (s > 0) printf "%.2f", q / s; else print "inf" }'; }
median() { printf '%s\n' "$@" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
spread() { printf '%s\n' "$@" | sort -n | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%s-%s", lo, hi }'; }
seconds() {
    local t0 t1
    t0=$(date +%s.%N)
    "$@" >/dev/null
    t1=$(date +%s.%N)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }'
}

SRC="$DIR/src-$SIZE-$DATA_MB.raw"
if [[ ! -f "$SRC" ]]; then
    qemu-img create -q -f raw "$SRC" "$SIZE"
    runs=16; per=$(( DATA_MB / runs )); gap=$(( $(numfmt --from=iec "$SIZE") / 1048576 / runs ))
    for i in $(seq 0 $(( runs - 1 ))); do
        dd if=/dev/urandom of="$SRC" bs=1M count=$per seek=$(( i * gap )) conv=notrunc status=none
    done
fi
FORMATS=${FORMATS:-vpc vdi vhdx vmdk}
# The sources of the format->raw cases, made by qemu-img.
for f in $FORMATS; do
    [[ -f "$DIR/src.$f" ]] || qemu-img convert -f raw -O "$f" "$SRC" "$DIR/src.$f"
done

results=()
printf '%-34s %9s %9s %6s   %s\n' "case" "qemu s" "strata s" "ratio" "spread qemu / strata"
# run_case NAME FMT_IN FMT_OUT SRC
run_case() {
    local name=$1 fin=$2 fout=$3 src=$4
    [[ $name =~ ${CASES:-.} ]] || return 0
    local qs=() ss=() i
    for (( i = 0; i < REPEAT; i++ )); do
        local order=(qemu strata)
        (( i % 2 == 1 )) && order=(strata qemu)
        for who in "${order[@]}"; do
            rm -f "$DIR/out-qemu" "$DIR/out-strata"
            if [[ $who == qemu ]]; then
                qs+=("$(seconds qemu-img convert -f "$fin" -O "$fout" "$src" "$DIR/out-qemu")")
            else
                ss+=("$(seconds "$STRATA_IMG" convert -f "$fin" -O "$fout" "$src" "$DIR/out-strata")")
            fi
        done
    done
    # The last outputs must be right.
    rm -f "$DIR/out-strata"
    "$STRATA_IMG" convert -f "$fin" -O "$fout" "$src" "$DIR/out-strata"
    qemu-img compare -q -f "$fin" -F "$fout" "$src" "$DIR/out-strata" ||
        { echo "$name: strata-img's output differs from the source!" >&2; exit 1; }
    if [[ $fout == vdi || $fout == vhdx || $fout == vmdk ]]; then
        qemu-img check -q "$DIR/out-strata" || { echo "$name: qemu-img check fails!" >&2; exit 1; }
    fi
    rm -f "$DIR/out-qemu" "$DIR/out-strata"
    local q s
    q=$(median "${qs[@]}"); s=$(median "${ss[@]}")
    printf '%-34s %9s %9s %6s   %s / %s\n' "$name" "$q" "$s" "$(ratio "$q" "$s")" \
        "$(spread "${qs[@]}")" "$(spread "${ss[@]}")"
    results+=("$name|$q ($(spread "${qs[@]}"))|$s ($(spread "${ss[@]}"))|$(ratio "$q" "$s")")
}

for f in $FORMATS; do
    run_case "convert raw->$f $SIZE (${DATA_MB}M data)" raw "$f" "$SRC"
    run_case "convert $f->raw $SIZE (${DATA_MB}M data)" "$f" raw "$DIR/src.$f"
done

{
    echo "| case | qemu-img s (min-max) | strata-img s (min-max) | ratio qemu/strata |"
    echo "|---|---|---|---|"
    for line in "${results[@]}"; do
        IFS='|' read -r n q s r <<<"$line"
        echo "| $n | $q | $s | $r |"
    done
} > "$DIR/summary.md"
echo "summary written to $DIR/summary.md"
