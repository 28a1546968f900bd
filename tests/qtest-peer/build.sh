#!/bin/sh
# Builds QEMU's own qtest binaries (ide-test, ahci-test, fdc-test, qos-test,
# fuzz-lsi53c895a-test, usb-hcd-uhci/ehci/xhci-test), the peer suite
# that `make qtest-peer` runs against Strata, from Debian's source package
# of the qemu-system-x86 that is installed (or, if none is, the candidate
# apt would install). Nothing of QEMU's source lands in the checkout: the
# binaries are cached outside it, keyed by that version, so a second run is
# a no-op and a new Debian update rebuilds.
#
# Prints the cache directory holding bin/ide-test, bin/ahci-test,
# bin/fdc-test, bin/qos-test, bin/fuzz-lsi53c895a-test and bin/usb-hcd-*-test.
set -eu

log() { echo "qtest-peer: $*" >&2; }

SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

version() {
    v=$(dpkg-query -W -f '${Status} ${Version}\n' qemu-system-x86 2>/dev/null |
        awk '$3 == "installed" { print $4 }')
    [ -n "$v" ] || v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ { print $2 }')
    [ -n "$v" ] && [ "$v" != "(none)" ] || return 1
    echo "$v"
}

# The candidate is unknown until the package lists exist (a fresh machine).
if ! BINVER=$(version); then
    $SUDO apt-get update -qq
    BINVER=$(version) || { log "no qemu-system-x86 version known to apt"; exit 1; }
fi
# A binNMU (+bN) or a different source name is recorded in the Source field.
SRC=$(apt-cache show "qemu-system-x86=$BINVER" | awk '/^Source:/ { print; exit }')
SRCNAME=qemu
SRCVER=$BINVER
case "$SRC" in
*"("*")"*) SRCNAME=$(echo "$SRC" | awk '{ print $2 }')
           SRCVER=$(echo "$SRC" | sed 's/.*(\(.*\)).*/\1/') ;;
"Source: "*) SRCNAME=$(echo "$SRC" | awk '{ print $2 }') ;;
esac

CACHE=${STRATA_QTEST_PEER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/strata/qtest-peer}
# "-asan": the test binaries are built with AddressSanitizer (see below);
# "-vu": qos-test has the vhost-user-blk cases.
OUT=$CACHE/$(echo "$SRCVER" | tr ':' '_')-asan-vu
if [ -x "$OUT/bin/ide-test" ] && [ -x "$OUT/bin/ahci-test" ] &&
   [ -x "$OUT/bin/fdc-test" ] && [ -x "$OUT/bin/qos-test" ] &&
   [ -x "$OUT/bin/fuzz-lsi53c895a-test" ] && [ -x "$OUT/bin/usb-hcd-uhci-test" ] &&
   [ -x "$OUT/bin/usb-hcd-ehci-test" ] && [ -x "$OUT/bin/usb-hcd-xhci-test" ]; then
    echo "$OUT"
    exit 0
fi
log "building QEMU $SRCVER qtest binaries into $OUT (takes a few minutes)"
start=$(date +%s)

# Debian's images list binary packages only; the sources come from the same
# mirrors under Types: deb-src, in a file of our own.
DEBSRC=/etc/apt/sources.list.d/strata-qtest-peer-src.sources
if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ &&
   ! grep -qs '^deb-src' /etc/apt/sources.list; then
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources |
            $SUDO tee "$DEBSRC" >/dev/null
    else
        $SUDO tee "$DEBSRC" >/dev/null <<SRCS
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRCS
    fi
    $SUDO apt-get update -qq
fi

# What a softmmu build with no optional features needs (x86_64-softmmu
# includes microvm, which needs libfdt; Debian strips the bundled dtc).
DEPS="dpkg-dev ninja-build meson pkg-config python3 gcc libglib2.0-dev libpixman-1-dev zlib1g-dev libfdt-dev flex bison"
missing=""
for p in $DEPS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
    log "installing$missing"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

WORK=$CACHE/work-$(echo "$SRCVER" | tr ':' '_')
rm -rf "$WORK"
mkdir -p "$WORK"
cd "$WORK"
# A deb-src entry whose lists were never fetched (or went stale) needs an
# update first.
if ! apt-get source -qq "$SRCNAME=$SRCVER" >/dev/null 2>source.log; then
    $SUDO apt-get update -qq
    apt-get source -qq "$SRCNAME=$SRCVER" >/dev/null 2>source.log ||
        { cat source.log >&2; exit 1; }
fi
SRCDIR=$(find . -mindepth 1 -maxdepth 1 -type d -name "$SRCNAME-*" | head -n 1)
[ -n "$SRCDIR" ] || { log "apt-get source unpacked nothing"; exit 1; }

mkdir build
cd build
# The system's meson, and only what the x86_64 qtest binaries link against.
# --enable-sanitizers: fdc-test runs its CVE reproducers only in a
# sanitizer build of itself (they check that QEMU does not crash; here
# they check Strata).
# --enable-tools only because meson defines the ahci-test target with the
# tools; ninja builds the test binaries and nothing else.
# --enable-vhost-user(-blk-server): qos-test then has vhost-user-blk-test,
# which runs Strata as the front end and strata-storage-daemon as the
# back end (QTEST_QEMU_STORAGE_DAEMON_BINARY).
nice -n 19 "../$SRCDIR/configure" --target-list=x86_64-softmmu \
    --without-default-features --disable-docs --enable-tools --enable-sanitizers \
    --enable-vhost-user --enable-vhost-user-blk-server \
    --disable-user --disable-werror --meson=meson >configure.log 2>&1 ||
    { tail -n 40 configure.log >&2; exit 1; }
USB_TESTS="tests/qtest/usb-hcd-uhci-test tests/qtest/usb-hcd-ehci-test tests/qtest/usb-hcd-xhci-test"
nice -n 19 ninja tests/qtest/qos-test tests/qtest/ide-test tests/qtest/ahci-test tests/qtest/fdc-test \
    tests/qtest/fuzz-lsi53c895a-test $USB_TESTS >ninja.log 2>&1 ||
    { tail -n 40 ninja.log >&2; exit 1; }

mkdir -p "$OUT.tmp/bin"
cp tests/qtest/qos-test tests/qtest/ide-test tests/qtest/ahci-test tests/qtest/fdc-test \
    tests/qtest/fuzz-lsi53c895a-test $USB_TESTS "$OUT.tmp/bin/"
echo "$SRCNAME $SRCVER (qemu-system-x86 $BINVER)" >"$OUT.tmp/VERSION"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
cd /
rm -rf "$WORK"
log "built in $(($(date +%s) - start)) s"
echo "$OUT"
