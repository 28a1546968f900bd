#!/bin/sh
# The peer suite: QEMU 7.2's own qtest binaries (ide-test, ahci-test,
# fdc-test, fuzz-lsi53c895a-test, usb-hcd-uhci/ehci/xhci-test, and
# qos-test's virtio-blk, virtio-scsi and vhost-user-blk cases) run against
# Strata, as libqtest runs them against qemu-system-x86_64 (and
# strata-storage-daemon as vhost-user-blk-test's qemu-storage-daemon).
# Each case runs in its own process (`-p PATH`) under a timeout, so a hang
# or a crash fails that case only, and its TAP line decides pass or fail.
#
# tests/qtest-peer/expected-pass lists the cases that must pass: the run
# fails if one of them does not. Cases that pass but are not listed are
# reported so the list can grow; it never shrinks.
#
# Environment:
#   STRATA              the strata binary (default: the debug build,
#                       built or brought up to date first)
#   QTEST_PEER_FILTER   an extended regex: run only the cases it matches
#   QTEST_PEER_TIMEOUT  seconds per case (default 60)
#   QTEST_PEER_LOGS     where the per-case logs go (default: a temp dir,
#                       kept when something fails)
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
EXPECTED=$HERE/expected-pass
TIMEOUT=${QTEST_PEER_TIMEOUT:-60}
FILTER=${QTEST_PEER_FILTER:-}

PEER=$("$HERE/build.sh")

if [ -z "${STRATA:-}" ]; then
    STRATA=${CARGO_TARGET_DIR:-$ROOT/target}/debug/strata
    (cd "$ROOT" && ${CARGO:-cargo} build -q --bin strata --bin strata-storage-daemon)
fi
[ -x "$STRATA" ] || { echo "qtest-peer: no strata binary at $STRATA" >&2; exit 1; }
# vhost-user-blk-test starts its back end with this (beside strata).
STRATA_SD=${STRATA_STORAGE_DAEMON:-$(dirname "$STRATA")/strata-storage-daemon}
[ -x "$STRATA_SD" ] || { echo "qtest-peer: no strata-storage-daemon at $STRATA_SD" >&2; exit 1; }
# Its cases run a second time with the real qemu-storage-daemon
# (qemu-utils) as the back end, Strata's front end against QEMU's server;
# they are listed as qemu-storage-daemon:CASE.
QSD=$(command -v qemu-storage-daemon) ||
    { echo "qtest-peer: qemu-storage-daemon is missing (Debian: qemu-utils)" >&2; exit 1; }

LOGS=${QTEST_PEER_LOGS:-$(mktemp -d "${TMPDIR:-/tmp}/qtest-peer.XXXXXX")}
mkdir -p "$LOGS/bin"
LOGS=$(cd "$LOGS" && pwd)
# libqtest takes the target architecture from the binary's name.
ln -sf "$STRATA" "$LOGS/bin/qemu-system-x86_64"
export QTEST_QEMU_BINARY="$LOGS/bin/qemu-system-x86_64"
# The qtest and QMP traffic of each case goes to its log (libqtest's
# -qtest-log follows QTEST_LOG), with Strata's stderr.
export QTEST_LOG=1
# The test binaries are AddressSanitizer builds (build.sh); glib's
# allocations alive at exit are not the tests' concern.
export ASAN_OPTIONS=detect_leaks=0
# ahci-test makes its qcow2 image with qemu-img (without it, it would fall
# back to a small raw image and skip the LBA48 cases).
QTEST_QEMU_IMG=$(command -v qemu-img) ||
    { echo "qtest-peer: qemu-img is missing (Debian: qemu-utils)" >&2; exit 1; }
export QTEST_QEMU_IMG

# The cases: every ide-test, ahci-test and fdc-test case, and qos-test's
# virtio-blk, virtio-scsi and vhost-user-blk cases.
: >"$LOGS/cases"
# (qos-test asks a strata for its machines and devices to list its cases;
# that conversation goes to list.log. An expected case missing from the
# list is reported as a failure below.)
QTEST_LOG= "$PEER/bin/ide-test" -l 2>"$LOGS/list.log" | grep '^/' |
    sed 's|^|ide-test |' >>"$LOGS/cases"
QTEST_LOG= "$PEER/bin/ahci-test" -l 2>>"$LOGS/list.log" | grep '^/' |
    sed 's|^|ahci-test |' >>"$LOGS/cases"
QTEST_LOG= "$PEER/bin/fdc-test" -l 2>>"$LOGS/list.log" | grep '^/' |
    sed 's|^|fdc-test |' >>"$LOGS/cases"
QTEST_LOG= "$PEER/bin/qos-test" -l 2>>"$LOGS/list.log" | grep '^/' | grep -E '/(virtio-blk|virtio-scsi|vhost-user-blk)' |
    sed 's|^|qos-test |' >>"$LOGS/cases"
grep '^qos-test .*/vhost-user-blk' "$LOGS/cases" | sed 's|^qos-test |qos-test+qsd |' >>"$LOGS/cases.qsd"
cat "$LOGS/cases.qsd" >>"$LOGS/cases"
QTEST_LOG= "$PEER/bin/fuzz-lsi53c895a-test" -l 2>>"$LOGS/list.log" | grep '^/' |
    sed 's|^|fuzz-lsi53c895a-test |' >>"$LOGS/cases"
for t in usb-hcd-uhci-test usb-hcd-ehci-test usb-hcd-xhci-test; do
    QTEST_LOG= "$PEER/bin/$t" -l 2>>"$LOGS/list.log" | grep '^/' |
        sed "s|^|$t |" >>"$LOGS/cases"
done
cp "$LOGS/cases" "$LOGS/all-cases"
if [ -n "$FILTER" ]; then
    grep -E "$FILTER" "$LOGS/cases" >"$LOGS/cases.f" || true
    mv "$LOGS/cases.f" "$LOGS/cases"
fi
# Cases for features Strata does not have (tests/qtest-peer/not-run: a
# regex and the reason, one a line) are listed as NOT RUN instead of
# waiting out their timeout: ahci-test's migration cases would each cost
# a minute.
NOTRUN=$HERE/not-run
: >"$LOGS/notrun"
if [ -f "$NOTRUN" ]; then
    grep -v '^#' "$NOTRUN" | grep . | while read -r re why; do
        grep -E " $re" "$LOGS/cases" | sed "s|\$|  ($why)|" >>"$LOGS/notrun" || true
    done
    for re in $(grep -v '^#' "$NOTRUN" | grep . | awk '{ print $1 }'); do
        grep -vE " $re" "$LOGS/cases" >"$LOGS/cases.f" || true
        mv "$LOGS/cases.f" "$LOGS/cases"
    done
fi
while read -r bin case why; do
    echo "NOT RUN $case $why"
done <"$LOGS/notrun"

# Binaries whose cases build on each other (fdc-test's drive state flows
# from case to case; usb-hcd-ehci-test's port routing changes in one case
# and is checked in the next) run whole, once.
WHOLE="fdc-test usb-hcd-ehci-test"

# The cases run in the log directory: vhost-user-blk-test makes its images
# in the current directory.
cd "$LOGS"

# pass/fail: cases of expected-pass; new/other: the rest.
pass=0 fail=0 other=0 new=0 missing=0
: >"$LOGS/results"
n=0
while read -r bin case; do
    n=$((n + 1))
    log=$LOGS/$n.log
    # The case's name in expected-pass and the results, the binary, and
    # vhost-user-blk-test's back end.
    key=$case exe=$bin sd=$STRATA_SD
    if [ "$bin" = qos-test+qsd ]; then
        key=qemu-storage-daemon:$case exe=qos-test sd=$QSD
    fi
    # Through a pipe: libqtest hands strata -qtest-log /dev/fd/2, which
    # strata (like QEMU) opens for writing, and reopening a file would
    # truncate it under the test's own output.
    case " $WHOLE " in
    *" $bin "*)
        # One process for every case, in the binary's order (its cases
        # share one machine); each case's TAP line decides it.
        log=$LOGS/$bin.log
        if [ ! -f "$log" ]; then
            { r=0; timeout -k 5 "$((TIMEOUT * 3))" "$PEER/bin/$bin" --tap </dev/null 2>&1 || r=$?
              echo $r >"$log.rc"; } | cat >"$log"
        fi
        rc=0 ;;
    *)
        # glib's -p also runs the cases below the path (/hotplug runs
        # /hotplug/usb-uas): skip those, they are cases of their own.
        set --
        for sub in $(awk -v b="$bin" -v c="$case/" '$1 == b && index($2, c) == 1 { print $2 }' "$LOGS/all-cases"); do
            set -- "$@" -s "$sub"
        done
        { r=0; QTEST_QEMU_STORAGE_DAEMON_BINARY=$sd \
              timeout -k 5 "$TIMEOUT" "$PEER/bin/$exe" --tap -p "$case" "$@" </dev/null 2>&1 || r=$?
          echo $r >"$log.rc"; } | cat >"$log"
        rc=$(cat "$log.rc") ;;
    esac
    if grep -q "^ok [0-9]* $case\$" "$log" && [ "$rc" = 0 ]; then
        res=PASS
    elif grep -q "^ok [0-9]* $case # SKIP" "$log"; then
        res=SKIP
    else
        res=FAIL
        [ "$rc" = 124 ] && res="FAIL (timeout ${TIMEOUT}s)"
    fi
    expected=no
    grep -qxF "$key" "$EXPECTED" && expected=yes
    case "$res:$expected" in
    PASS:yes) pass=$((pass + 1)); tag="" ;;
    PASS:no) new=$((new + 1)); tag="  (passes, not yet in expected-pass)" ;;
    FAIL*:yes) fail=$((fail + 1)); tag="  (EXPECTED TO PASS; log $log)" ;;
    SKIP:yes) fail=$((fail + 1)); tag="  (EXPECTED TO PASS, skipped; log $log)" ;;
    *) other=$((other + 1)); tag="" ;;
    esac
    echo "$res $key$tag" | tee -a "$LOGS/results"
done <"$LOGS/cases"

# A listed case that no binary offers any more is a failure too.
if [ -z "$FILTER" ]; then
    sed -e 's|^qos-test+qsd |qemu-storage-daemon:|' -e 's|^[^ ]* ||' "$LOGS/cases" >"$LOGS/keys"
    for c in $(grep -v '^#' "$EXPECTED" | grep .); do
        if ! grep -qxF "$c" "$LOGS/keys"; then
            echo "FAIL $c  (EXPECTED TO PASS, not offered by the binaries)"
            missing=$((missing + 1))
        fi
    done
fi

[ $((fail + missing + other)) = 0 ] || echo "qtest-peer: logs in $LOGS"
echo "qtest-peer: all cases: $((pass + new)) pass ($new not yet in expected-pass), $((fail + other)) do not"
# The closing line counts the cases that must pass.
echo "qtest-peer: $pass passed, $((fail + missing)) failed"
if [ $((fail + missing)) != 0 ]; then
    exit 1
fi
# Nothing to look at: a temporary log directory goes.
if [ $other = 0 ] && [ -z "${QTEST_PEER_LOGS:-}" ]; then
    rm -rf "$LOGS"
fi
