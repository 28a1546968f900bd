#!/usr/bin/env bash
# strata-img bench against qemu-img bench (QEMU's libiscsi driver, Debian's
# qemu-block-extra) on the same iSCSI LUN: a private tgtd on a loopback
# port serving a 1 GiB backing file on tmpfs (/dev/shm), so the target's
# disk is not what is measured. Cases: 4 KiB reads and 4 KiB writes at
# depth 32, strided with -S 1052672 (1 MiB + 4 KiB, as bench/nbd.sh does:
# qemu-img bench has no random mode; the stride walks the whole LUN and
# wraps), the same requests for both tools. REPEAT runs per tool (default 5), alternating
# which goes first; the median, the spread (min-max) and the ratio
# qemu/strata (>= 1.0: Strata is as fast or faster) are printed.
# Needs root (tgtd). Usage: bench/iscsi-bench.sh
#   (env: STRATA_IMG, COUNT, REPEAT, PORT)
set -euo pipefail
cd "$(dirname "$0")/.."

STRATA_IMG=${STRATA_IMG:-target/release/strata-img}
if [[ ! -x "$STRATA_IMG" ]]; then
    cargo build --release -p cli --bin strata-img >&2
fi
command -v tgtd >/dev/null || { echo "tgtd not installed (make deps)" >&2; exit 1; }
[[ -f /usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so ]] || {
    echo "qemu-img has no iSCSI driver (qemu-block-extra; make deps)" >&2; exit 1; }

COUNT=${COUNT:-100000}
REPEAT=${REPEAT:-5}
PORT=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
CTL=$(( 30000 + $$ % 2000 ))
IQN=iqn.2024-01.org.strata:bench
LUN=/dev/shm/strata-iscsi-bench.img
URI="iscsi://127.0.0.1:$PORT/$IQN/1"

cleanup() {
    [[ -n "${TGTD:-}" ]] && kill -9 "$TGTD" 2>/dev/null || true
    rm -f "$LUN" "/var/run/tgtd/socket.$CTL" "/var/run/tgtd/socket.$CTL.lock"
}
trap cleanup EXIT

# A fully written LUN, so reads hit data.
dd if=/dev/zero of="$LUN" bs=1M count=1024 status=none
tgtd -f -C "$CTL" --iscsi "portal=127.0.0.1:$PORT" >/dev/null 2>&1 &
TGTD=$!
for _ in $(seq 100); do
    tgtadm -C "$CTL" --lld iscsi --op show --mode sys >/dev/null 2>&1 && break
    sleep 0.1
done
tgtadm -C "$CTL" --lld iscsi --op new --mode target --tid 1 -T "$IQN"
tgtadm -C "$CTL" --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b "$LUN"
tgtadm -C "$CTL" --lld iscsi --op bind --mode target --tid 1 -I ALL

# "Run completed in X seconds." -> X
run_time() { "$@" | sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p'; }
ratio() { awk -v q="$1" -v s="$2" 'BEGIN { if (s > 0) printf "%.2f", q / s; else print "inf" }'; }
median() { printf '%s\n' "$@" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
spread() { printf '%s\n' "$@" | sort -n | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%s-%s", lo, hi }'; }

printf '%-28s %10s %10s %8s\n' "case (count $COUNT)" "qemu-img" "strata" "ratio"
bench_case() {
    local name=$1; shift
    local qs=() ss=() i
    for (( i = 0; i < REPEAT; i++ )); do
        if (( i % 2 == 0 )); then
            qs+=("$(run_time qemu-img bench "$@" "$URI")")
            ss+=("$(run_time "$STRATA_IMG" bench "$@" "$URI")")
        else
            ss+=("$(run_time "$STRATA_IMG" bench "$@" "$URI")")
            qs+=("$(run_time qemu-img bench "$@" "$URI")")
        fi
    done
    local q s
    q=$(median "${qs[@]}")
    s=$(median "${ss[@]}")
    printf '%-28s %9ss %9ss %8s   (spread: qemu %s / strata %s)\n' \
        "$name" "$q" "$s" "$(ratio "$q" "$s")" "$(spread "${qs[@]}")" "$(spread "${ss[@]}")"
}

bench_case "4k read d32 strided" -f raw -c "$COUNT" -d 32 -s 4k -S 1052672
bench_case "4k write d32 strided" -f raw -w -c "$COUNT" -d 32 -s 4k -S 1052672
