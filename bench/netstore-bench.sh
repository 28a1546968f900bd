#!/usr/bin/env bash
# The rbd and http protocol drivers against QEMU's (issue NETSTORE):
# `strata-img bench` and `qemu-img bench` (qemu-block-extra's rbd and curl
# drivers) on the same image, side by side: a throwaway one-OSD memstore
# Ceph cluster (tests/servers/ceph-cluster.sh) for rbd, and
# tests/servers/http_range.py serving a raw file from tmpfs for http
# (read-only). REPEAT runs per case (default 5), alternating which tool
# goes first; median and min-max spread. Ratio = qemu-img time /
# strata-img time (>= 1.0: Strata as fast or faster). Not a test.
set -euo pipefail
cd "$(dirname "$0")/.."

STRATA_IMG=${STRATA_IMG:-target/release/strata-img}
if [[ ! -x "$STRATA_IMG" ]]; then
    cargo build --release -p cli --bin strata-img >&2
fi
for so in block-rbd block-curl; do
    [[ -f /usr/lib/x86_64-linux-gnu/qemu/$so.so ]] || {
        echo "qemu-img has no $so driver (qemu-block-extra; make deps)" >&2; exit 1; }
done

REPEAT=${REPEAT:-5}
COUNT=${COUNT:-20000}
DIR=$(mktemp -d /dev/shm/strata-netstore-bench.XXXXXX)
cleanup() {
    [[ -n "${HTTPD:-}" ]] && kill "$HTTPD" 2>/dev/null || true
    tests/servers/ceph-cluster.sh stop "$DIR/ceph" >/dev/null 2>&1 || true
    rm -rf "$DIR"
}
trap cleanup EXIT

# rbd: a 256 MiB image, written full once so reads find data.
CONF=$(tests/servers/ceph-cluster.sh start "$DIR/ceph" | tail -n 1)
rbd -c "$CONF" create --size 256M rbd/bench
head -c 256M /dev/urandom > "$DIR/data.raw"
"$STRATA_IMG" convert -n -f raw -O raw "$DIR/data.raw" "rbd:rbd/bench:conf=$CONF"
RBD="rbd:rbd/bench:conf=$CONF"

# http: the same bytes from a range-serving server on loopback.
mkdir -p "$DIR/www"
mv "$DIR/data.raw" "$DIR/www/data.raw"
exec 3< <(python3 tests/servers/http_range.py "$DIR/www")
HTTPD=$!
read -r _ PORT <&3
HTTP="http://127.0.0.1:$PORT/data.raw"

run_time() { "$@" 2>/dev/null | sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p'; }
ratio() { awk -v q="$1" -v s="$2" 'BEGIN { if (s > 0) printf "%.2f", q / s; else print "inf" }'; }
median() { printf '%s\n' "$@" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
spread() { printf '%s\n' "$@" | sort -n | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%s-%s", lo, hi }'; }

printf '%-34s %10s %10s %8s\n' "case" "qemu-img" "strata" "ratio"
bench_case() {
    local name=$1 target=$2; shift 2
    local qs=() ss=() i
    for (( i = 0; i < REPEAT; i++ )); do
        if (( i % 2 == 0 )); then
            qs+=("$(run_time qemu-img bench "$@" "$target")")
            ss+=("$(run_time "$STRATA_IMG" bench "$@" "$target")")
        else
            ss+=("$(run_time "$STRATA_IMG" bench "$@" "$target")")
            qs+=("$(run_time qemu-img bench "$@" "$target")")
        fi
    done
    local q s
    q=$(median "${qs[@]}")
    s=$(median "${ss[@]}")
    printf '%-34s %9ss %9ss %8s   (spread: qemu %s / strata %s)\n' \
        "$name" "$q" "$s" "$(ratio "$q" "$s")" "$(spread "${qs[@]}")" "$(spread "${ss[@]}")"
}

bench_case "rbd 4k read d32" "$RBD" -f raw -c "$COUNT" -d 32 -s 4k -S 1052672
bench_case "rbd 4k write d32" "$RBD" -f raw -w -c "$COUNT" -d 32 -s 4k -S 1052672
bench_case "rbd 64k read d8" "$RBD" -f raw -c "$((COUNT / 4))" -d 8 -s 64k
bench_case "http 64k read d8" "$HTTP" -f raw -c "$((COUNT / 4))" -d 8 -s 64k
bench_case "http 4k read d1 (readahead hits)" "$HTTP" -f raw -c "$COUNT" -d 1 -s 4k
