#!/usr/bin/env bash
# strata-nbd vs qemu-nbd serving the same image (raw and qcow2, on tmpfs)
# over a unix socket and TCP loopback, measured by `qemu-img bench` as the
# NBD client (issue 15's benchmark set):
#   4 KiB reads at depth 32, strided over the image (qemu-img bench has no
#     random mode: -S 1M+4k steps through the whole image and wraps);
#   4 KiB writes, same pattern (-w);
#   1 MiB sequential reads at depth 32.
# Each server serves its own copy of one image (the two cannot share one
# image: both lock it for writing, as they should). Each case runs REPEAT
# times (default 5), alternating which server goes first; the median, the
# spread (min-max) and the ratio qemu/strata of the medians are printed
# (>= 1.0: Strata is as fast or faster).
# Both servers run with their defaults (qemu-nbd: aio=threads; strata-nbd:
# io_uring when the host has it) unless BENCH_AIO=threads|io_uring gives
# both the same engine.
# Usage: bench/nbd.sh [--quick]   (env: STRATA_NBD, BENCH_DIR, COUNT, REPEAT, SIZE, BENCH_AIO)
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0
[[ "${1:-}" == "--quick" ]] && QUICK=1
STRATA_NBD=${STRATA_NBD:-target/release/strata-nbd}
if [[ ! -x "$STRATA_NBD" ]]; then
    cargo build --release -p cli --bin strata-nbd >&2
fi
for t in qemu-img qemu-nbd; do
    command -v "$t" >/dev/null || { echo "$t not installed (qemu-utils)" >&2; exit 1; }
done

DIR=${BENCH_DIR:-/dev/shm/strata-nbd-bench-$$}
mkdir -p "$DIR"
REPEAT=${REPEAT:-5}
COUNT=${COUNT:-100000}
SIZE=${SIZE:-1G}
if (( QUICK )); then COUNT=10000; REPEAT=3; SIZE=256M; fi
SEQ=$(( COUNT / 32 > 200 ? COUNT / 32 : 200 ))
STEP=$(( (1 << 20) + 4096 ))

AIO=()
[[ -n "${BENCH_AIO:-}" ]] && AIO=("--aio=$BENCH_AIO")

pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [[ -z "${BENCH_DIR:-}" ]]; then rm -rf "$DIR"; fi
}
trap cleanup EXIT

# "Run completed in X seconds." -> X
run_time() { "$@" | sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p'; }
ratio() { awk -v q="$1" -v s="$2" 'BEGIN { if (s > 0) printf "%.2f", q / s; else print "inf" }'; }
median() { printf '%s\n' "$@" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
spread() { printf '%s\n' "$@" | sort -n | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%s-%s", lo, hi }'; }

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_ready() { # URL
    local i
    for (( i = 0; i < 200; i++ )); do
        qemu-img info "$1" >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    echo "server at $1 never came up" >&2; exit 1
}

# start NAME BIN FMT IMG TRANSPORT -> sets URL_<NAME>
start() {
    local name=$1 bin=$2 fmt=$3 img=$4 tr=$5 url
    if [[ "$tr" == unix ]]; then
        local sock="$DIR/$name.sock"
        rm -f "$sock"
        "$bin" -f "$fmt" "${AIO[@]}" -t -e 0 -k "$sock" "$img" &
        url="nbd+unix:///?socket=$sock"
    else
        local port
        port=$(free_port)
        "$bin" -f "$fmt" "${AIO[@]}" -t -e 0 -b 127.0.0.1 -p "$port" "$img" &
        url="nbd://127.0.0.1:$port/"
    fi
    pids+=($!)
    wait_ready "$url"
    printf -v "URL_$name" '%s' "$url"
}

stop_all() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    pids=()
}

printf '%-34s %10s %10s %7s   %s\n' "case" "qemu-nbd" "strata-nbd" "ratio" "spread (s): qemu / strata"
results=()
bench_case() { # NAME ARGS... (the URL is appended)
    local name=$1; shift
    local qs=() ss=() i
    for (( i = 0; i < REPEAT; i++ )); do
        if (( i % 2 == 0 )); then
            qs+=("$(run_time qemu-img bench -f raw "$@" "$URL_q")")
            ss+=("$(run_time qemu-img bench -f raw "$@" "$URL_s")")
        else
            ss+=("$(run_time qemu-img bench -f raw "$@" "$URL_s")")
            qs+=("$(run_time qemu-img bench -f raw "$@" "$URL_q")")
        fi
    done
    local q s r
    q=$(median "${qs[@]}"); s=$(median "${ss[@]}"); r=$(ratio "$q" "$s")
    printf '%-34s %9ss %9ss %7s   %s / %s\n' "$name" "$q" "$s" "$r" "$(spread "${qs[@]}")" "$(spread "${ss[@]}")"
    results+=("$name|$q|$s|$r|$(spread "${qs[@]}")|$(spread "${ss[@]}")")
}

for fmt in raw qcow2; do
    base="$DIR/base.$fmt"
    if [[ "$fmt" == raw ]]; then
        qemu-img create -q -f raw -o preallocation=full "$base" "$SIZE"
    else
        qemu-img create -q -f qcow2 -o preallocation=metadata "$base" "$SIZE"
    fi
    for tr in unix tcp; do
        cp --sparse=never "$base" "$DIR/q.$fmt"
        cp --sparse=never "$base" "$DIR/s.$fmt"
        start q qemu-nbd "$fmt" "$DIR/q.$fmt" "$tr"
        start s "$STRATA_NBD" "$fmt" "$DIR/s.$fmt" "$tr"
        bench_case "$fmt $tr 4k read d32 strided" -c "$COUNT" -d 32 -s 4k -S "$STEP"
        bench_case "$fmt $tr 4k write d32 strided" -w -c "$COUNT" -d 32 -s 4k -S "$STEP"
        bench_case "$fmt $tr 1M seq read d32" -c "$SEQ" -d 32 -s 1M
        stop_all
        rm -f "$DIR/q.$fmt" "$DIR/s.$fmt"
    done
    rm -f "$base"
done

# Machine-readable summary for BENCHMARKS.md.
SUMMARY=${SUMMARY:-bench/out/nbd-summary.md}
mkdir -p "$(dirname "$SUMMARY")"
{
    echo "| case | qemu-nbd (s) | strata-nbd (s) | ratio qemu/strata | spread qemu | spread strata |"
    echo "|---|---|---|---|---|---|"
    for line in "${results[@]}"; do
        IFS='|' read -r n q s r sq ss <<<"$line"
        echo "| $n | $q | $s | $r | $sq | $ss |"
    done
} > "$SUMMARY"
echo "summary written to $SUMMARY"
